"""A real round through the HTTP round controller against a real `fedpersona trainer` process.

This is the Helm chart's path: a gateway holds `interface.remote(...)` pointed at the trainer
pod's `/admin/rounds`, and the trainer pod runs the round in a child process (Flower's
Simulation Engine on the micro models). The round must succeed and publish, a second start while
it runs must be refused with the same `RoundBusy` the in-process controller raises, and the
progress the client reads must be the trainer's record.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fedpersona.adapters import AdapterStore, Slot
from fedpersona.trainer.data.personas import write_silos
from fedpersona.trainer.models.basemodel import ModelPair
from fedpersona.trainer.rounds import interface
from fedpersona.trainer.rounds.interface import RoundBusy, RoundSpec, RunState
from support.servers import free_port

pytestmark = [pytest.mark.flower, pytest.mark.slow]

KEY = "remote-round-admin-key-0123456789"
SPEC = RoundSpec(
    algorithm="fedavg", rounds=1, users=("alice", "bob"), local_steps=2, batch_size=2, max_len=64,
    rank=4,
)  # fmt: skip


def test_a_round_through_the_http_controller_against_a_real_trainer(
    tmp_path: Path, micro_models: ModelPair
) -> None:
    home = tmp_path / "home"
    write_silos(home / "silos", {"alice": "pirate", "bob": "robot"}, n_train=4, n_eval=2)
    (home / "models").mkdir()
    (home / "models" / "large").symlink_to(micro_models.large.path)
    port = free_port()
    env = {**os.environ, "FEDPERSONA_ADMIN_KEY": KEY}
    env.pop("FEDPERSONA_ENVIRONMENT", None)
    log = tmp_path / "trainer.log"
    command = [sys.executable, "-m", "fedpersona", "trainer", "--home", str(home)]
    command += ["--port", str(port), "--cpus", "1"]
    with open(log, "wb") as out:
        trainer = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    rounds = interface.remote(f"http://127.0.0.1:{port}/admin/rounds", admin_key=KEY)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert trainer.poll() is None, log.read_text()[-4000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).is_success:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the trainer API did not start"
            time.sleep(0.3)

        run_id = rounds.start(SPEC)
        with pytest.raises(RoundBusy):
            rounds.start(SPEC)
        deadline = time.monotonic() + 480
        while not (status := rounds.get(run_id)).done:
            assert time.monotonic() < deadline, f"run {run_id} still {status.state}"
            time.sleep(1.0)
        run_log = home / "runs" / f"{run_id}.log"
        assert status.state == RunState.succeeded, run_log.read_text()[-4000:]
        assert status.spec == SPEC and status.progress == 1.0 and len(status.rounds) == 1
        assert {c.user for c in status.rounds[0].clients} == {"alice", "bob"}
        store = AdapterStore(home / "store")
        glob = store.current(Slot.global_adapter("fedavg"))
        assert glob is not None and glob.id == status.rounds[0].global_version
        assert [r.id for r in rounds.list()] == [run_id]
    finally:
        rounds.close()
        trainer.send_signal(signal.SIGTERM)
        try:
            trainer.wait(timeout=60)
        except subprocess.TimeoutExpired:
            trainer.kill()
            trainer.wait()
