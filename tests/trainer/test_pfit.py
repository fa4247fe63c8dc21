"""PFIT: sparse module exchange (pure), RLOO laws, a real client round on the micro model with
real reward models, and `fedpersona train --algorithm pfit` on Flower's Simulation Engine."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
from fedpersona.adapters.preferences import DEFAULT_REWARD_MIX
from fedpersona.trainer.errors import AggregationError, MethodError
from fedpersona.trainer.methods import LoraSpec, Product, Shares, TrainConfig, get_method
from fedpersona.trainer.methods.pfit import FedRlhf, Pfit, rl_seed
from fedpersona.trainer.rlhf.sparsity import module_of, sparse_mean, top_modules

KEY = "base_model.model.model.layers.{l}.self_attn.{p}.lora_{w}.weight"


def _params(value: float, layers: int = 2) -> dict[str, np.ndarray]:
    return {
        KEY.format(l=layer, p=p, w=w): np.full((2, 3), value, np.float32)
        for layer in range(layers)
        for p in ("q_proj", "v_proj")
        for w in "AB"
    }


# ------------------------------------------------------------------------------ pure parts


def test_module_of_joins_a_and_b() -> None:
    a, b = KEY.format(l=0, p="q_proj", w="A"), KEY.format(l=0, p="q_proj", w="B")
    assert module_of(a) == module_of(b) == "base_model.model.model.layers.0.self_attn.q_proj"


def test_top_modules_keeps_the_most_important_fraction() -> None:
    scores = {"a": 3.0, "b": 1.0, "c": 2.0, "d": 2.0}
    assert top_modules(scores, 0.5) == {"a", "c"}  # tie c/d broken by name
    assert top_modules(scores, 0.25) == {"a"}
    assert top_modules(scores, 0.01) == {"a"}  # never empty
    assert top_modules(scores, 1.0) == set(scores)


def test_sparse_mean_averages_each_key_over_its_senders_only() -> None:
    previous = _params(0.0)
    keys = sorted(previous)
    one = {k: np.full((2, 3), 1.0, np.float32) for k in keys[:4]}
    two = {k: np.full((2, 3), 4.0, np.float32) for k in keys[2:6]}
    out = sparse_mean(previous, [(one, 1), (two, 3)])
    for k in keys[:2]:
        np.testing.assert_allclose(out[k], 1.0)
    for k in keys[2:4]:
        np.testing.assert_allclose(out[k], np.average([1.0, 4.0], weights=[1, 3]))
    for k in keys[4:6]:
        np.testing.assert_allclose(out[k], 4.0)
    for k in keys[6:]:
        np.testing.assert_array_equal(out[k], previous[k])  # nobody sent it: kept


def test_sparse_mean_refuses_foreign_or_broken_uploads() -> None:
    previous = _params(0.0)
    with pytest.raises(AggregationError, match="does not have"):
        sparse_mean(previous, [({"x.lora_A.weight": np.zeros((2, 3))}, 1)])
    key = next(iter(previous))
    with pytest.raises(AggregationError, match="shape"):
        sparse_mean(previous, [({key: np.zeros((3, 3))}, 1)])
    with pytest.raises(AggregationError, match="NaN"):
        sparse_mean(previous, [({key: np.full((2, 3), np.nan)}, 1)])


def test_rloo_advantages_leave_one_out_and_sum_to_zero() -> None:
    import torch
    from fedpersona.trainer.rlhf.rloo import leave_one_out

    rewards = torch.tensor([1.0, 2.0, 6.0], dtype=torch.float64)
    adv = leave_one_out(rewards)
    np.testing.assert_allclose(adv.numpy(), [1 - 4, 2 - 3.5, 6 - 1.5])
    assert abs(float(adv.sum())) < 1e-12
    with pytest.raises(MethodError):
        leave_one_out(rewards[:1])


def test_behaviours_and_validation() -> None:
    pfit, dense = get_method("pfit"), get_method("fedrlhf")
    assert isinstance(pfit, Pfit) and isinstance(dense, FedRlhf)
    assert pfit.behaviour.rewards and dense.behaviour.rewards
    assert pfit.behaviour.shares == Shares.GLOBAL_LORA
    assert Product.PERSONAL in pfit.behaviour.publishes
    assert dense.behaviour.shares == Shares.LORA
    assert Product.PERSONAL not in dense.behaviour.publishes
    assert pfit.global_spec.rank + pfit.personal_spec.rank == dense.global_spec.rank == 8
    with pytest.raises(MethodError):
        get_method("pfit", share_fraction=0.0)
    with pytest.raises(Exception, match="reward_mix"):
        get_method("fedrlhf", reward_mix=1.5)


# ----------------------------------------------------------------- real client rounds


@pytest.fixture(scope="module")
def rewards_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedpersona.trainer.models.rewards import MICRO_REWARDS, build_reward_models

    out = tmp_path_factory.mktemp("pfit-rewards")
    build_reward_models(out, MICRO_REWARDS)
    return out


@pytest.fixture
def silos(tmp_path: Path) -> dict[str, Path]:
    from fedpersona.trainer.data.personas import write_silos

    return write_silos(tmp_path / "silos", {"alice": "pirate", "bob": "chef"}, n_train=8, n_eval=2)


MIXES = {"alice": 1.0, "bob": 0.0}
CONFIG = TrainConfig(steps=2, lr=5e-3, batch_size=2, max_len=64, seed=3, total_rounds=2)


def test_the_users_mix_applies_unless_the_method_fixes_one() -> None:
    pfit, shared = get_method("pfit"), get_method("fedrlhf", reward_mix=0.5)
    assert pfit.user_reward_mix(dataclasses.replace(CONFIG, reward_mix=0.2)) == 0.2
    assert pfit.user_reward_mix(CONFIG) == DEFAULT_REWARD_MIX  # never set
    assert shared.user_reward_mix(dataclasses.replace(CONFIG, reward_mix=0.2)) == 0.5
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(MethodError, match="reward_mix"):
            dataclasses.replace(CONFIG, reward_mix=bad)


def test_the_rl_seed_differs_per_round_and_user_and_is_reproducible() -> None:
    # One seed for every round would replay round one's prompt batches and samples.
    seeds = {
        (r, u): rl_seed(CONFIG, round_idx=r, silo=Path("/silos") / u)
        for r in (1, 2, 3)
        for u in ("alice", "bob")
    }
    assert len(set(seeds.values())) == len(seeds)
    assert seeds[(2, "bob")] == rl_seed(CONFIG, round_idx=2, silo=Path("/elsewhere/bob"))
    assert all(0 <= s < 2**31 for s in seeds.values())


@pytest.mark.slow
def test_exact_kl_is_zero_for_a_no_op_lora_and_positive_after_training(
    micro_models, rewards_dir: Path, silos: dict[str, Path]
) -> None:
    from fedpersona.trainer.learn.lora_train import LoraSession
    from fedpersona.trainer.rlhf.rloo import (
        RlConfig,
        RlooTrainer,
        exact_kl,
        load_prompts,
    )

    session = LoraSession(micro_models.large, {"p": LoraSpec(rank=4, alpha=8.0)}, seed=0)
    prompts = load_prompts(silos["alice"], "train")
    trainer = RlooTrainer(
        session,
        prompts,
        # A reward the policy can move: longer completions score higher.
        reward=lambda _p, completions: np.array([len(c) / 50 for c in completions]),
        config=RlConfig(steps=3, lr=2e-2, seed=0, samples=3, max_new_tokens=8),
        trainable={"p": None},
    )
    rollout = trainer.rollout(prompts[0], seed=1)
    assert float(exact_kl(session.model, rollout).abs().max()) < 1e-5  # B = 0: policy == ref
    again = trainer.rollout(prompts[0], seed=1)
    assert torch_equal(rollout.input_ids, again.input_ids)  # seeded sampling
    trainer.run()
    assert float(exact_kl(session.model, trainer.rollout(prompts[0], seed=1)).min()) > 0
    assert {"train_loss", "reward_mean", "kl_last"} <= set(trainer.metrics())


def torch_equal(a, b) -> bool:  # type: ignore[no-untyped-def]
    return bool((a == b).all()) and a.shape == b.shape


@pytest.mark.slow
def test_a_pfit_round_shares_only_the_selected_modules_and_keeps_the_personal_lora(
    micro_models, rewards_dir: Path, silos: dict[str, Path]
) -> None:
    spec = LoraSpec(rank=8, alpha=16.0)
    pfit = get_method("pfit", spec=spec, rewards_dir=str(rewards_dir))
    dense = get_method("fedrlhf", spec=spec, rewards_dir=str(rewards_dir))
    base = micro_models.large
    g = pfit.init_global(base_model=base, seed=0)
    updates = {
        user: pfit.client_update(
            base_model=base,
            silo=silo,
            global_params=g,
            state={},
            config=dataclasses.replace(CONFIG, reward_mix=MIXES[user]),
            round_idx=1,
        )
        for user, silo in silos.items()
    }
    alice = updates["alice"]
    assert alice.metrics["reward_mix"] == 1.0 and updates["bob"].metrics["reward_mix"] == 0.0
    modules = {module_of(k) for k in alice.upload}
    assert len(modules) == alice.metrics["shared_modules"] == 4  # half of 2 layers x 4 projections
    assert set(alice.upload) < set(g)
    # The personal LoRA never leaves: its tensors are not in the upload.
    assert alice.state and not any(
        np.array_equal(alice.state[k], alice.upload.get(k, np.zeros(0))) for k in alice.state
    )
    assert alice.served.r == 8  # global (4) + personal (4), composed
    new = pfit.aggregate(previous=g, results=[(u.upload, u.num_examples) for u in updates.values()])
    assert set(new) == set(g)
    served = pfit.served_adapter(base_model=base, global_params=new, state=alice.state)
    assert served.r == 8
    # Uplink: the sparse half of the half-rank global is at most half the dense LoRA's.
    dense_global = dense.init_global(base_model=base, seed=0)
    d = dense.client_update(
        base_model=base, silo=silos["alice"], global_params=dense_global, state={}, config=CONFIG,
        round_idx=1,
    )  # fmt: skip
    up = sum(v.nbytes for v in alice.upload.values())
    assert up <= 0.5 * sum(v.nbytes for v in d.upload.values())
    assert d.state == {} and d.served.r == 8


@pytest.mark.slow
def test_a_user_without_reward_models_gets_a_clear_error(micro_models, silos, tmp_path) -> None:
    from fedpersona.trainer.errors import RewardModelError

    pfit = get_method("pfit", rewards_dir=str(tmp_path / "none"))
    g = pfit.init_global(base_model=micro_models.large, seed=0)
    with pytest.raises(RewardModelError, match="models rewards"):
        pfit.client_update(
            base_model=micro_models.large, silo=silos["alice"], global_params=g, state={},
            config=CONFIG, round_idx=1,
        )  # fmt: skip


@pytest.mark.flower
@pytest.mark.slow
def test_train_algorithm_pfit_on_the_simulation_engine(
    micro_models, rewards_dir: Path, silos: dict[str, Path], tmp_path: Path
) -> None:
    """`fedpersona train --algorithm pfit` with the default reward models beside the base model;
    each user's lambda set by the operator (`fedpersona users reward-mix`) is what their client
    trained with, every round record carries it, and the store serves each user the
    composition."""
    import json

    from fedpersona.adapters import AdapterStore, Slot, load_lora
    from fedpersona.trainer.rounds.records import RunRecords, RunState

    from fedpersona.cli import main as cli_main

    home = tmp_path
    shutil.copytree(micro_models.large.path, home / "models" / "large")
    shutil.copytree(rewards_dir, home / "models" / "rewards")
    for user, lam in MIXES.items():
        assert cli_main(["users", "--home", str(home), "add", user]) == 0
        assert cli_main(["users", "--home", str(home), "reward-mix", user, str(lam)]) == 0
    argv = [
        "train", "--home", str(home), "--algorithm", "pfit", "--rounds", "2",
        "--local-steps", "2", "--lr", "0.005", "--users", "alice,bob",
    ]  # fmt: skip
    assert cli_main(argv) == 0
    (status,) = RunRecords(home / "runs").list_all()
    assert status.state == RunState.succeeded, status.error
    assert len(status.rounds) == 2
    for record in status.rounds:
        mixes = {c.user: c.metrics["reward-mix"] for c in record.clients}
        assert mixes == MIXES
        assert record.bytes_up > 0
    store = AdapterStore(home / "store")
    for user in ("alice", "bob"):
        served = store.current(Slot.user_served(user))
        assert served is not None and load_lora(served.path).r == 8
        assert store.current(Slot.user_personal(user)) is not None
    assert store.current(Slot.global_adapter("pfit")) is not None
    assert json.loads(json.dumps(status.model_dump(mode="json")))["spec"]["algorithm"] == "pfit"
