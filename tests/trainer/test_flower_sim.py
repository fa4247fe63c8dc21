"""The Flower apps in the real Simulation Engine, on a numpy stand-in method (fast plumbing).

What is checked on real messages and a real store: the upload never carries personal tensors;
each round publishes a global version and one served adapter per user, equal to the exact
composition of the new global with the user's own personal LoRA; bytes are the payloads'.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flower_toy_method import GLOBAL_MODULE, PERSONAL_MODULE, ToyMethod, keys
from flwr.app import Message

from adapters import AdapterStore, Slot, load_lora
from trainer.basemodel import ModelPair
from trainer.runconfig import RunConfig, config_of
from trainer.runs import RoundSpec, RunRecords, RunState
from trainer.simulation import simulate
from trainer.strategy import UPLOAD_KEY, payload_bytes

pytestmark = pytest.mark.flower

USERS = {"alice": 3, "bob": 5}  # user -> number of training chats (the toy's constant)


def make_home(tmp_path: Path, models: ModelPair) -> Path:
    home = tmp_path / "home"
    for user, n in USERS.items():
        silo = home / "silos" / user
        silo.mkdir(parents=True)
        line = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
        (silo / "train.jsonl").write_text("\n".join([line] * n) + "\n")
    (home / "models").mkdir()
    (home / "models" / "large").symlink_to(models.large.path)
    return home


def start(home: Path, *, rounds: int) -> RunConfig:
    spec = RoundSpec(algorithm="pftt", rounds=rounds, users=tuple(USERS))
    status = RunRecords(home / "runs").create(spec, users=list(USERS))
    return config_of(spec, run_id=status.id, home=home, users=tuple(USERS))


def test_rounds_publish_composed_adapters_and_keep_personal_tensors_local(
    tmp_path: Path, micro_models: ModelPair
) -> None:
    home = make_home(tmp_path, micro_models)
    config = start(home, rounds=2)
    seen: list[tuple[str, Message]] = []

    status = simulate(
        config, method_factory=lambda _c: ToyMethod(), observer=lambda d, m: seen.append((d, m))
    )

    assert status.state == RunState.succeeded, status.error
    assert [r.round for r in status.rounds] == [1, 2]
    ups = [m for d, m in seen if d == "up"]
    assert len(ups) == 4
    for message in ups:
        for record in message.content.array_records.values():
            assert not any(PERSONAL_MODULE in key for key in record), "personal tensor uploaded"
        assert set(message.content.array_records[UPLOAD_KEY]) == set(keys(GLOBAL_MODULE))

    # The global after round r is the example-weighted mean of init + per-user constants.
    total = sum(USERS.values())
    mean_shift = sum(n * n for n in USERS.values()) / total  # each user adds its own count
    store = AdapterStore(home / "store")
    glob = load_lora(store.current(Slot.global_adapter("pftt")).path)
    a_key, _ = keys(GLOBAL_MODULE)
    np.testing.assert_allclose(glob.tensors[a_key].numpy(), 0.5 + 2 * mean_shift, rtol=1e-6)

    last = status.rounds[-1]
    assert last.global_version == store.current(Slot.global_adapter("pftt")).id
    for user, n in USERS.items():
        served_version = store.current(Slot.user_served(user))
        assert last.served_versions[user] == served_version.id
        served = load_lora(served_version.path)
        personal = load_lora(store.current(Slot.user_personal(user)).path)
        # exact composition: delta(served) = delta(global) + delta(personal), module by module
        assert torch.equal(served.delta(GLOBAL_MODULE), glob.delta(GLOBAL_MODULE))
        assert torch.equal(served.delta(PERSONAL_MODULE), personal.delta(PERSONAL_MODULE))
        _, p_b = keys(PERSONAL_MODULE)
        np.testing.assert_allclose(personal.tensors[p_b].numpy(), 2 * n)  # state survived rounds

    for record in status.rounds:
        assert {c.user for c in record.clients} == set(USERS)
        assert record.bytes_up == sum(c.bytes_up for c in record.clients)
        assert all(c.bytes_up > 0 and c.bytes_down > 0 for c in record.clients)
        assert record.train_loss is not None and record.wall_s > 0
    assert sum(r.bytes_up for r in status.rounds) == sum(payload_bytes(m.content) for m in ups)
