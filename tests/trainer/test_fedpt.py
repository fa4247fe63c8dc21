"""FedPT training: FedAvg of a LoRA on the small model, published as proxy experts.

Real PEFT training on the MICRO small model and a real store; the published experts are loaded
back with the serving side's loader (`fedpersona.service.proxy_tuning.experts.ExpertLibrary`), and
one run
goes through the real Flower Simulation Engine (`fedpersona train --algorithm fedpt`'s path).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fedpersona.adapters import AdapterStore, Slot
from fedpersona.service.proxy_tuning.experts import ExpertLibrary, ExpertRef, load_small_model
from fedpersona.trainer.data.personas import write_silos
from fedpersona.trainer.methods import get_method
from fedpersona.trainer.methods.base import BaseRole, LoraSpec, TrainConfig
from fedpersona.trainer.methods.fedpt import FedPT, params_nbytes, publish_experts, run_fedpt
from fedpersona.trainer.models.basemodel import ModelPair

USERS = {"alice": "pirate", "bob": "chef"}
CONFIG = TrainConfig(steps=2, lr=5e-3, batch_size=2, max_len=96, seed=0)
SPEC = LoraSpec(rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def silos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_silos(tmp_path_factory.mktemp("silos"), USERS, n_train=6, n_eval=2)


def test_registered_as_a_method() -> None:
    method = get_method("fedpt", spec=SPEC)
    assert isinstance(method, FedPT) and method.behaviour.experts
    assert method.behaviour.base_role == BaseRole.SMALL


def test_rounds_average_uploads_and_personal_parts_stay_local(
    micro_models: ModelPair, silos: dict[str, Path], tmp_path: Path
) -> None:
    method = FedPT(spec=SPEC)
    result = run_fedpt(
        small=micro_models.small,
        silos=silos,
        rounds=2,
        config=CONFIG,
        method=method,
        personal_steps=2,
    )
    init = method.init_global(base_model=micro_models.small, seed=CONFIG.seed)
    assert set(result.global_params) == set(init)
    assert all(k.startswith("base_model.model.model.layers.") for k in init)
    # Training moved the global (B starts at zero), and every round every user uploaded the
    # shared LoRA only: exactly rounds x users x its size.
    b_keys = [k for k in init if k.endswith("lora_B.weight")]
    assert any(np.abs(result.global_params[k]).max() > 0 for k in b_keys)
    assert result.upload_bytes == 2 * len(USERS) * params_nbytes(init)
    assert len(result.rounds) == 2 and result.client_seconds > 0
    for user in USERS:
        diff = max(np.abs(result.personal[user][k] - result.global_params[k]).max() for k in init)
        assert diff > 0, f"{user}'s personal expert equals the global one"

    store = AdapterStore(tmp_path / "store", max_rank=16)
    publish_experts(store, small=micro_models.small, spec=SPEC, result=result, users=list(USERS))
    glob = store.current(Slot.global_expert())
    assert glob is not None and glob.id == result.global_version
    assert glob.base_model == micro_models.small.name
    # The serving side loads them through the store as LoRA factors on the small model.
    small = load_small_model(micro_models.small.path)
    library = ExpertLibrary(
        store=store, base=small, base_name=micro_models.small.name, capacity=4, max_rank=64
    )
    name = "model.layers.0.self_attn.q_proj"
    for user in USERS:
        version = store.current(Slot.user_expert(user))
        assert version is not None and version.id == result.user_versions[user]
        expert = library.get(ExpertRef(version.slot, version.id))
        a, scaled_b = expert.factors[name]
        base = small.get_submodule(name).weight
        assert isinstance(base, torch.Tensor)
        delta = scaled_b @ a  # what the expert adds to this projection's weight
        assert delta.shape == base.shape and delta.abs().max() > 0


@pytest.mark.flower
def test_flower_run_publishes_proxy_experts(
    micro_models: ModelPair, silos: dict[str, Path], tmp_path: Path
) -> None:
    from fedpersona.trainer.flower.runconfig import config_of
    from fedpersona.trainer.flower.simulation import simulate
    from fedpersona.trainer.rounds.records import RoundSpec, RunRecords, RunState

    home = tmp_path / "home"
    (home / "silos").mkdir(parents=True)
    for user, silo in silos.items():
        (home / "silos" / user).symlink_to(silo)
    (home / "models").mkdir()
    (home / "models" / "small").symlink_to(micro_models.small.path)
    spec = RoundSpec(
        algorithm="fedpt", rounds=1, users=tuple(USERS), local_steps=2, rank=4, max_len=96
    )
    status = RunRecords(home / "runs").create(spec, users=list(USERS))
    config = config_of(spec, run_id=status.id, home=home, users=tuple(USERS))
    assert config.base_model == home / "models" / "small"

    final = simulate(config)

    assert final.state == RunState.succeeded, final.error
    store = AdapterStore(home / "store")
    glob = store.current(Slot.global_expert())
    assert glob is not None and glob.base_model == micro_models.small.name
    assert final.rounds[-1].global_version == glob.id
    for user in USERS:
        expert = store.current(Slot.user_expert(user))
        assert expert is not None and expert.base_model == micro_models.small.name
        assert store.current(Slot.user_served(user)) is None  # FedPT serves no large LoRA
