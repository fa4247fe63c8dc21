"""Training runs in child processes on this machine: the in-process round controller.

`InProcessRounds` implements `fedpersona.trainer.rounds.interface.RoundController`; callers
outside the trainer reach it through that interface (`interface.in_process(home)`), never by
importing this module: the gateway in embedded mode, and the trainer pod's HTTP API
(`fedpersona trainer`, composed in `fedpersona.trainer_api`). `start` writes a queued run record
and starts `python -m fedpersona.trainer.commands.train --run-id ...` as a child process: a crash,
a leak or a stuck native library in training then cannot take the caller down, and killing the
child is a clean way to abort. One run at a time: a second `start` raises `RoundBusy` (HTTP
409), also when another process (a `fedpersona train` in a shell) holds the runs lock.

With a `SuperLinkTarget` the runs go to that SuperLink (Deployment Engine) instead of the
Simulation Engine: the run's users are resolved against the node bindings rather than the silos
under the home, and the child gets the target's flags, bindings included.

A watcher thread per run follows its record (the child writes it round by round), feeds the
Prometheus metrics, and marks the run failed if the child exits without finishing it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from fedpersona.trainer.errors import RoundBusy, TrainerError
from fedpersona.trainer.rounds.lock import RunLock, resolve_users
from fedpersona.trainer.rounds.metrics import TrainerMetrics
from fedpersona.trainer.rounds.records import (
    RoundSpec,
    RunNotFound,
    RunRecords,
    RunState,
    RunStatus,
    utcnow,
)
from fedpersona.trainer.rounds.superlink import SuperLinkTarget

__all__ = ["InProcessRounds"]

log = logging.getLogger(__name__)


class InProcessRounds:
    """Runs training runs one at a time in child processes; reads their records.

    `extra_args` are appended to the child's command line (e.g. `--base-model`, `--cpus`);
    `env` is merged over this process's environment for the child; `superlink` sends the runs
    to that SuperLink (Deployment Engine) with its node bindings.
    """

    def __init__(
        self,
        home: Path,
        *,
        runs_dir: Path | None = None,
        metrics: TrainerMetrics | None = None,
        python: str = sys.executable,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        poll_s: float = 0.5,
        superlink: SuperLinkTarget | None = None,
    ) -> None:
        self.home = Path(home)
        self.runs_dir = Path(runs_dir) if runs_dir else self.home / "runs"
        self.records = RunRecords(self.runs_dir)
        self.metrics = metrics or TrainerMetrics()
        self.python = python
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.poll_s = poll_s
        self.superlink = superlink
        self._mutex = threading.Lock()
        self._active: tuple[str, subprocess.Popen[bytes]] | None = None
        self._watchers: dict[str, threading.Thread] = {}

    # ------------------------------------------------------------------------------ API

    def start(self, spec: RoundSpec) -> str:
        """Queue `spec` and start it now; return the run id. Raises `RoundBusy`, `NoSilo`."""
        with self._mutex:
            if self._active is not None and self._active[1].poll() is None:
                raise RoundBusy(f"run {self._active[0]} is still in progress")
            if RunLock(self.runs_dir).held_elsewhere():
                raise RoundBusy("another process is running a training run on this home")
            if self.superlink is not None:
                users = self.superlink.resolve_users(spec.users)
            else:
                users = resolve_users(self.home, spec.users)
            status = self.records.create(spec, users=users)
            log_path = self.runs_dir / f"{status.id}.log"
            command = [
                self.python,
                "-m",
                "fedpersona.trainer.commands.train",
                "--home",
                str(self.home),
                "--runs-dir",
                str(self.runs_dir),
                "--run-id",
                status.id,
                *(self.superlink.child_args() if self.superlink is not None else ()),
                *self.extra_args,
            ]
            with open(log_path, "ab") as log_file:
                process = subprocess.Popen(
                    command,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env={**os.environ, **self.env},
                    start_new_session=True,
                )
            self._active = (status.id, process)
            self.metrics.active.set(1)
            watcher = threading.Thread(
                target=self._watch,
                args=(status.id, process),
                name=f"watch-{status.id}",
                daemon=True,
            )
            self._watchers[status.id] = watcher
            watcher.start()
            log.info("started run %s (pid %d): %s", status.id, process.pid, spec)
            return status.id

    def get(self, run_id: str) -> RunStatus:
        """The run's record; raises `RunNotFound`."""
        return self.records.read(run_id)

    def list(self) -> list[RunStatus]:
        """Every run, oldest first."""
        return self.records.list_all()

    def active(self) -> str | None:
        """The id of the run in progress, if any."""
        with self._mutex:
            if self._active is not None and self._active[1].poll() is None:
                return self._active[0]
            return None

    def wait(self, run_id: str, timeout: float | None = None) -> RunStatus:
        """Block until the run has finished (and been accounted); return its record."""
        watcher = self._watchers.get(run_id)
        if watcher is not None:
            watcher.join(timeout)
            if watcher.is_alive():
                raise TimeoutError(f"run {run_id} still running after {timeout} s")
        return self.get(run_id)

    def cancel(self, run_id: str) -> None:
        """Stop the run's process (it is then recorded as failed)."""
        with self._mutex:
            if self._active is None or self._active[0] != run_id:
                return
            process = self._active[1]
        if process.poll() is None:
            # The child leads its own process group (start_new_session): signal the group, so
            # the simulation's Ray workers go down with it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)

    def close(self) -> None:
        """Stop a run in progress (the gateway shutting down) and wait for its watcher."""
        active = self.active()
        if active is not None:
            self.cancel(active)
            self.wait(active, timeout=30)

    # -------------------------------------------------------------------------- watching

    def _watch(self, run_id: str, process: subprocess.Popen[bytes]) -> None:
        seen = 0
        algorithm = "unknown"
        while True:
            exited = process.poll() is not None
            try:
                status = self.records.read(run_id)
                algorithm = status.spec.algorithm
                for record in status.rounds[seen:]:
                    self.metrics.observe_round(algorithm, record)
                seen = len(status.rounds)
            except RunNotFound:
                status = None
            if exited:
                break
            try:
                process.wait(timeout=self.poll_s)
            except subprocess.TimeoutExpired:
                continue
        code = process.returncode
        if status is None or not status.done:
            error = f"trainer process exited with code {code} before finishing the run"
            log.error("run %s: %s (log: %s)", run_id, error, self.runs_dir / f"{run_id}.log")
            try:
                status = self.records.update(
                    run_id, state=RunState.failed, finished_at=utcnow(), error=error
                )
            except (RunNotFound, OSError, TrainerError) as e:
                log.error("run %s: could not record the failure: %s", run_id, e)
        if status is not None:
            self.metrics.observe_run_end(algorithm, status.state.value)
        with self._mutex:
            if self._active is not None and self._active[0] == run_id:
                self._active = None
                self.metrics.active.set(0)
