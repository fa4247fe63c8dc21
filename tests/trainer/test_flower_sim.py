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
from fedpersona.adapters import AdapterStore, Slot, compose, load_lora
from fedpersona.trainer.data.personas import write_silos
from fedpersona.trainer.flower.runconfig import RunConfig, config_of
from fedpersona.trainer.flower.simulation import simulate
from fedpersona.trainer.flower.strategy import payload_bytes
from fedpersona.trainer.models.basemodel import ModelPair
from fedpersona.trainer.rounds.records import RoundSpec, RunRecords, RunState
from flower_toy_method import GLOBAL_MODULE, CrashingToyMethod, ToyMethod, keys
from flwr.app import Message

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


def test_real_pftt_rounds_publish_compositions_and_keep_personal_tensors_local(
    tmp_path: Path, micro_models: ModelPair
) -> None:
    home = tmp_path / "home"
    write_silos(home / "silos", {"alice": "pirate", "bob": "poet"}, n_train=6, n_eval=2)
    (home / "models").mkdir()
    (home / "models" / "large").symlink_to(micro_models.large.path)
    spec = RoundSpec(
        algorithm="pftt",
        rounds=2,
        users=("alice", "bob"),
        local_steps=2,
        batch_size=2,
        max_len=64,
        rank=4,
    )
    status = RunRecords(home / "runs").create(spec, users=["alice", "bob"])
    config = config_of(spec, run_id=status.id, home=home, users=("alice", "bob"))
    seen: list[tuple[str, Message]] = []

    final = simulate(config, observer=lambda d, m: seen.append((d, m)), cpus=1)

    assert final.state == RunState.succeeded, final.error
    assert [r.round for r in final.rounds] == [1, 2] and final.progress == 1.0
    store = AdapterStore(home / "store")
    glob = load_lora(store.current(Slot.global_adapter("pftt")).path)  # type: ignore[union-attr]
    personal_bytes = set()
    for user in ("alice", "bob"):
        personal = load_lora(store.current(Slot.user_personal(user)).path)  # type: ignore[union-attr]
        assert personal.r == 2  # half of the rank-4 budget; the global has the other half
        personal_bytes |= {t.numpy().tobytes() for t in personal.tensors.values()}
        served = load_lora(store.current(Slot.user_served(user)).path)  # type: ignore[union-attr]
        assert final.rounds[-1].served_versions[user] == store.current(Slot.user_served(user)).id  # type: ignore[union-attr]
        expected = compose(glob, personal)
        assert served.r == 4
        for key, tensor in expected.tensors.items():
            assert torch.equal(served.tensors[key], tensor), key

    ups = [m for d, m in seen if d == "up"]
    downs = [m for d, m in seen if d == "down"]
    assert len(ups) == len(downs) == 4
    for message in ups:
        for record in message.content.array_records.values():
            for key, array in record.items():
                assert array.numpy().tobytes() not in personal_bytes, f"personal {key} uploaded"
    # Accounting is the serialized payloads of the very messages that were exchanged.
    assert sum(r.bytes_up for r in final.rounds) == sum(payload_bytes(m.content) for m in ups)
    assert sum(r.bytes_down for r in final.rounds) == sum(payload_bytes(m.content) for m in downs)
    for done in final.rounds:
        assert {c.user for c in done.clients} == {"alice", "bob"}
        assert all(c.bytes_up > 0 and c.train_loss is not None for c in done.clients)
        assert done.train_loss is not None and done.wall_s > 0
    # The client kept its personal LoRA in its silo, for the next run.
    assert (home / "silos" / "alice" / ".fedpersona" / "pftt-state.npz").is_file()


def test_a_round_that_crashes_midway_publishes_nothing_and_the_next_run_succeeds(
    tmp_path: Path, micro_models: ModelPair
) -> None:
    home = make_home(tmp_path, micro_models)
    store = AdapterStore(home / "store")
    crashing = start(home, rounds=3)

    failed = simulate(crashing, method_factory=lambda _c: CrashingToyMethod(), cpus=1)

    assert failed.state == RunState.failed
    assert "boom" in (failed.error or "")
    assert [r.round for r in failed.rounds] == [1]  # round 2 never completed
    first = failed.rounds[0]
    # Round 2 had staged alice's served adapter and the global before bob's failed: none of it
    # became current; every slot still serves round 1.
    assert store.current(Slot.global_adapter("pftt")).id == first.global_version  # type: ignore[union-attr]
    for user in USERS:
        assert store.current(Slot.user_served(user)).id == first.served_versions[user]  # type: ignore[union-attr]
        assert len(store.versions(Slot.user_served(user))) == 1
    assert not list((home / "runs" / "staging").rglob("*.safetensors"))

    retry = simulate(start(home, rounds=1), method_factory=lambda _c: ToyMethod(), cpus=1)

    assert retry.state == RunState.succeeded, retry.error
    for user in USERS:
        assert store.current(Slot.user_served(user)).id == retry.rounds[0].served_versions[user]  # type: ignore[union-attr]
    # The retry continued from round 1's global (the last published one), not from round 2's.
    total = sum(USERS.values())
    shift = sum(n * n for n in USERS.values()) / total
    glob = load_lora(store.current(Slot.global_adapter("pftt")).path)  # type: ignore[union-attr]
    np.testing.assert_allclose(glob.tensors[keys(GLOBAL_MODULE)[0]].numpy(), 0.5 + 2 * shift)


def test_fedprox_from_the_command_line_trains_and_publishes(
    tmp_path: Path, micro_models: ModelPair
) -> None:
    from fedpersona.trainer.commands.train import main

    home = tmp_path / "home"
    write_silos(home / "silos", {"alice": "pirate", "bob": "poet"}, n_train=4, n_eval=1)
    (home / "models").mkdir()
    (home / "models" / "large").symlink_to(micro_models.large.path)
    argv = ["--home", str(home), "--algorithm", "fedprox", "--prox-mu", "0.05", "--rounds", "1"]
    argv += ["--local-steps", "1", "--batch-size", "2", "--max-len", "64", "--rank", "2"]

    assert main([*argv, "--cpus", "1", "--json"]) == 0

    (status,) = RunRecords(home / "runs").list_all()
    assert status.state == RunState.succeeded, status.error
    assert (status.spec.algorithm, status.spec.prox_mu) == ("fedprox", 0.05)
    glob = AdapterStore(home / "store").current(Slot.global_adapter("fedprox"))
    assert glob is not None and status.rounds[0].global_version == glob.id
    assert load_lora(glob.path).r == 2
