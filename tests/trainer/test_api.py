"""`InProcessRounds`: background runs in child processes, one at a time, with records and metrics.

The slow test starts real `python -m fedpersona.trainer.commands.train` children that run FedAvg in
Flower's
Simulation Engine on the micro models: a second start while one runs is refused (`RoundBusy`,
the gateway's 409), a run killed midway is recorded as failed and publishes nothing, and the
next run succeeds and feeds the Prometheus metrics.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fedpersona.adapters import AdapterStore, Slot
from fedpersona.trainer.data.personas import write_silos
from fedpersona.trainer.errors import NoSilo
from fedpersona.trainer.models.basemodel import ModelPair
from fedpersona.trainer.rounds.controller import InProcessRounds
from fedpersona.trainer.rounds.interface import (
    RoundBusy,
    RoundController,
    RoundSpec,
    RunNotFound,
    RunState,
)
from fedpersona.trainer.rounds.lock import RunLock
from prometheus_client import generate_latest

SPEC = RoundSpec(
    algorithm="fedavg",
    rounds=1,
    users=("alice", "bob"),
    local_steps=2,
    batch_size=2,
    max_len=64,
    rank=4,
)


def make_home(tmp_path: Path, models: ModelPair) -> Path:
    home = tmp_path / "home"
    write_silos(home / "silos", {"alice": "pirate", "bob": "robot"}, n_train=4, n_eval=2)
    (home / "models").mkdir()
    (home / "models" / "large").symlink_to(models.large.path)
    return home


def test_start_refuses_while_another_process_holds_the_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    write_silos(home / "silos", {"alice": "pirate"}, n_train=2, n_eval=1)
    controller = InProcessRounds(home)
    assert isinstance(controller, RoundController)  # the interface's in-process implementation
    with RunLock(home / "runs"), pytest.raises(RoundBusy):
        controller.start(RoundSpec(users=("alice",)))
    assert controller.list() == []  # nothing was queued
    with pytest.raises(NoSilo, match="carol") as missing:
        controller.start(RoundSpec(users=("carol",)))
    assert missing.value.param == "users"
    with pytest.raises(RunNotFound):
        controller.get("r-20260101t000000-abcdef")
    with pytest.raises(RunNotFound):
        controller.get("../../etc/passwd")


def wait_for(predicate, timeout: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.flower
@pytest.mark.slow
def test_one_run_at_a_time_a_killed_run_fails_cleanly_and_the_next_succeeds(
    tmp_path: Path, micro_models: ModelPair
) -> None:
    home = make_home(tmp_path, micro_models)
    controller = InProcessRounds(home, extra_args=["--cpus", "1"], poll_s=0.2)
    store = AdapterStore(home / "store")

    killed = controller.start(SPEC)
    with pytest.raises(RoundBusy):
        controller.start(SPEC)
    assert controller.active() == killed
    wait_for(lambda: controller.get(killed).state == RunState.running, timeout=120)
    controller.cancel(killed)
    status = controller.wait(killed, timeout=60)
    assert status.state == RunState.failed
    assert "exited" in (status.error or "") and status.rounds == []
    assert store.slots() == []  # the killed run published nothing
    assert controller.active() is None

    ok = controller.start(SPEC)
    status = controller.wait(ok, timeout=480)
    assert status.state == RunState.succeeded, (home / "runs" / f"{ok}.log").read_text()[-4000:]
    assert status.progress == 1.0 and len(status.rounds) == 1
    assert store.current(Slot.global_adapter("fedavg")).id == status.rounds[0].global_version  # type: ignore[union-attr]
    assert [s.id for s in controller.list()] == [killed, ok]
    text = generate_latest(controller.metrics.registry).decode()
    assert 'fedpersona_trainer_rounds_total{algorithm="fedavg"} 1.0' in text
    assert 'fedpersona_trainer_runs_total{algorithm="fedavg",state="failed"} 1.0' in text
    assert 'fedpersona_trainer_runs_total{algorithm="fedavg",state="succeeded"} 1.0' in text
    assert 'fedpersona_trainer_client_uplink_bytes_count{algorithm="fedavg"} 2.0' in text
