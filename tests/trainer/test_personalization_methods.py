"""The personalized baselines and the personalization round on the micro model: FedAvg + local
fine-tuning, FedSA-LoRA (A shared, B personal), and PFTT/PerFIT's last round, which re-trains
only the personal part against the final global and uploads nothing."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fedpersona.adapters import compose
from fedpersona.trainer.data import personas
from fedpersona.trainer.flower.packing import pack
from fedpersona.trainer.methods import LoraSpec, TrainConfig, get_method
from fedpersona.trainer.methods.base import ClientUpdate, Method, method_settings
from fedpersona.trainer.methods.fedsa import is_a, is_b
from fedpersona.trainer.methods.pruning import MASK_SUFFIX
from fedpersona.trainer.models.basemodel import ModelPair
from fedpersona.trainer.rounds.publish import personal_adapter

SPEC = LoraSpec(rank=4, alpha=8.0)
ROUNDS = 3
CONFIG = TrainConfig(steps=4, lr=1e-2, batch_size=4, max_len=96, seed=0, total_rounds=ROUNDS)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def silo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("silos")
    return personas.write_silos(root, {"alice": "pirate"}, n_train=8, n_eval=2)["alice"]


def _round(
    method: Method, model: ModelPair, silo: Path, *, glob: dict, state: dict, round_idx: int
) -> ClientUpdate:
    return method.client_update(
        base_model=model.large,
        silo=silo,
        global_params=glob,
        state=state,
        config=CONFIG,
        round_idx=round_idx,
    )


def _tensors_equal(adapter, params: dict[str, np.ndarray]) -> bool:  # type: ignore[no-untyped-def]
    return adapter.tensors.keys() == params.keys() and all(
        np.array_equal(adapter.tensors[k].numpy(), params[k]) for k in params
    )


def test_fedavg_ft_is_fedavg_then_fine_tunes_the_final_global(
    micro_models: ModelPair, silo: Path
) -> None:
    ft, plain = get_method("fedavg-ft", spec=SPEC), get_method("fedavg", spec=SPEC)
    glob = ft.init_global(base_model=micro_models.large, seed=0)
    first = _round(ft, micro_models, silo, glob=glob, state={}, round_idx=1)
    reference = _round(plain, micro_models, silo, glob=glob, state={}, round_idx=1)
    assert first.state == {} and first.upload.keys() == glob.keys()
    assert all(np.array_equal(first.upload[k], reference.upload[k]) for k in glob)

    final = _round(ft, micro_models, silo, glob=glob, state={}, round_idx=ROUNDS)
    assert final.upload == {} and final.metrics["personalization_round"] == 1.0
    assert ft.aggregate(previous=glob, results=[(final.upload, 8)]) == glob
    assert not all(np.array_equal(final.state[k], glob[k]) for k in glob)  # it trained
    served = ft.served_adapter(base_model=micro_models.large, global_params=glob, state=final.state)
    assert _tensors_equal(served, final.state)
    mine = personal_adapter(ft, base_model=micro_models.large, state=final.state)
    assert mine is not None and _tensors_equal(mine, final.state)
    # Before the last round a user is served the global.
    cold = ft.served_adapter(base_model=micro_models.large, global_params=glob, state={})
    assert _tensors_equal(cold, glob)


def test_fedsa_shares_a_keeps_b_and_its_last_round_trains_only_b(
    micro_models: ModelPair, silo: Path
) -> None:
    method = get_method("fedsa", spec=SPEC)
    glob = method.init_global(base_model=micro_models.large, seed=0)
    assert glob and all(is_a(k) for k in glob)
    first = _round(method, micro_models, silo, glob=glob, state={}, round_idx=1)
    assert first.upload.keys() == glob.keys()  # A only: B never leaves the client
    assert {k for k in first.state if is_b(k)} and all(
        np.any(first.state[k]) for k in first.state if is_b(k)
    )
    new_glob = method.aggregate(previous=glob, results=[(first.upload, 8), (first.upload, 2)])
    served = method.served_adapter(
        base_model=micro_models.large, global_params=new_glob, state=first.state
    )
    for key, tensor in served.tensors.items():
        expected = new_glob[key] if is_a(key) else first.state[key]
        assert np.array_equal(tensor.numpy(), expected), key

    final = _round(method, micro_models, silo, glob=new_glob, state=first.state, round_idx=ROUNDS)
    assert final.upload == {}
    for key in new_glob:  # A stayed the final global's
        assert np.array_equal(final.state[key], new_glob[key])
    assert any(not np.array_equal(final.state[k], first.state[k]) for k in final.state if is_b(k))
    # The global slot (no user): A with B = 0, i.e. the base model.
    empty = method.served_adapter(base_model=micro_models.large, global_params=new_glob, state={})
    assert all(not torch.any(t) for k, t in empty.tensors.items() if is_b(k))


def test_pftt_personal_round_trains_only_the_personal_lora_on_the_final_global(
    micro_models: ModelPair, silo: Path
) -> None:
    method = get_method("pftt", spec=SPEC, personal_round=True)
    glob = method.init_global(base_model=micro_models.large, seed=0)
    first = _round(method, micro_models, silo, glob=glob, state={}, round_idx=1)
    assert first.upload.keys() == glob.keys()
    final = _round(method, micro_models, silo, glob=glob, state=first.state, round_idx=ROUNDS)
    assert final.upload == {}
    assert method.aggregate(previous=glob, results=[({}, 3), ({}, 5)]) == glob
    assert any(not np.array_equal(final.state[k], first.state[k]) for k in final.state)
    expected = compose(
        method.adapter(glob, method.global_spec, micro_models.large),  # type: ignore[attr-defined]
        method.adapter(final.state, method.personal_spec, micro_models.large),  # type: ignore[attr-defined]
    )
    served = method.served_adapter(
        base_model=micro_models.large, global_params=glob, state=final.state
    )
    assert all(torch.equal(served.tensors[k], t) for k, t in expected.tensors.items())
    assert all(torch.equal(final.served.tensors[k], t) for k, t in expected.tensors.items())
    # Without the option the last round is an ordinary federated round.
    plain = get_method("pftt", spec=SPEC)
    assert _round(plain, micro_models, silo, glob=glob, state={}, round_idx=ROUNDS).upload


def test_perfit_personal_round_fine_tunes_the_users_masked_copy(
    micro_models: ModelPair, silo: Path
) -> None:
    method = get_method("perfit", spec=SPEC, personal_round=True)
    glob = method.init_global(base_model=micro_models.large, seed=0)
    first = _round(method, micro_models, silo, glob=glob, state={}, round_idx=1)
    assert all(k.endswith(MASK_SUFFIX) for k in first.state)
    assert personal_adapter(method, base_model=micro_models.large, state=first.state) is None
    final = _round(method, micro_models, silo, glob=glob, state=first.state, round_idx=ROUNDS)
    assert final.upload == {}
    values = {k: v for k, v in final.state.items() if not k.endswith(MASK_SUFFIX)}
    assert values.keys() == glob.keys()
    for key, value in values.items():  # pruned entries stay zero: the user's architecture
        assert not np.any(value[first.state[key + MASK_SUFFIX] == 0])
    mine = personal_adapter(method, base_model=micro_models.large, state=final.state)
    assert mine is not None and _tensors_equal(mine, values)
    served = method.served_adapter(base_model=micro_models.large, global_params=glob, state=values)
    assert _tensors_equal(served, values)


def test_wire_bytes_of_a_half_rank_shared_part(micro_models: ModelPair) -> None:
    """A shared LoRA of a quarter of the budget (PFTT's global rank 2 of 8) sends at most half
    of FedAvg's bytes; FedSA's A is about half; counted as `ArrayRecord.count_bytes`."""
    rank8 = LoraSpec(rank=8, alpha=16.0)
    fedavg = pack(
        get_method("fedavg", spec=rank8).init_global(base_model=micro_models.large, seed=0)
    )
    pftt = get_method("pftt", spec=rank8, global_rank=2, personal_rank=6)
    pftt_up = pack(pftt.init_global(base_model=micro_models.large, seed=0))
    fedsa_up = pack(
        get_method("fedsa", spec=rank8).init_global(base_model=micro_models.large, seed=0)
    )
    assert pftt_up.count_bytes() <= 0.5 * fedavg.count_bytes()
    assert fedsa_up.count_bytes() <= 0.51 * fedavg.count_bytes()


def test_method_settings_tell_options_apart() -> None:
    a = method_settings(get_method("pftt", spec=SPEC))
    b = method_settings(get_method("pftt", spec=SPEC, personal_round=True))
    c = method_settings(get_method("pftt", spec=dataclasses.replace(SPEC, rank=8, alpha=16.0)))
    assert (
        a != b
        and a != c
        and a["spec"]
        == {
            "rank": 4,
            "alpha": 8.0,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        }
    )
