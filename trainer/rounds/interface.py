"""The round-controller interface: the one door into the trainer for everything outside it.

`RoundController` is a Protocol: start a training run from a `RoundSpec`, read one run or all
of them, close. Two implementations sit behind it, both built by the factories here:

- `in_process(home)`: `fedpersona.trainer.rounds.controller.InProcessRounds`, which runs each
  training run in a child process on this machine (the embedded gateway, the trainer pod);
- `remote(url, admin_key=...)`: `fedpersona.trainer.rounds.remote.RemoteRounds`, an HTTP client of
  a trainer pod's `/admin/rounds` (the gateway pods in the Helm chart).

Both raise the same domain errors, so a caller never knows which one it holds: `RoundBusy` (one
run at a time), `RunNotFound`, `InvalidRoundSpec` (names the field in `param`; `NoSilo` is one)
and `RoundsUnreachable` (the remote trainer is down or refused the caller).

The gateway (`fedpersona.service`) imports the trainer through this module only (a test scans
the imports). It imports neither torch nor Flower: the implementations are imported lazily by
the factories.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from fedpersona.trainer.errors import (
    InvalidRoundSpec,
    NoSilo,
    RoundBusy,
    RoundsUnreachable,
    RunNotFound,
    TrainerError,
)
from fedpersona.trainer.rounds.records import RoundRecord, RoundSpec, RunState, RunStatus

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = [
    "InvalidRoundSpec",
    "NoSilo",
    "RoundBusy",
    "RoundController",
    "RoundRecord",
    "RoundSpec",
    "RoundsUnreachable",
    "RunNotFound",
    "RunState",
    "RunStatus",
    "TrainerError",
    "in_process",
    "remote",
]


@runtime_checkable
class RoundController(Protocol):
    """Start federated training runs and follow them; one run at a time."""

    def start(self, spec: RoundSpec) -> str:
        """Queue `spec` and start it; return the run id.

        Raises `RoundBusy` while another run is in progress, `InvalidRoundSpec` for a spec this
        trainer cannot run (a user without data)."""
        ...

    def get(self, run_id: str) -> RunStatus:
        """The run's record (state, progress, per-round metrics); raises `RunNotFound`."""
        ...

    def list(self) -> list[RunStatus]:
        """Every run, oldest first."""
        ...

    def close(self) -> None:
        """Release what the controller holds (stop a local run in progress, close a client)."""
        ...


def in_process(
    home: Path,
    *,
    runs_dir: Path | None = None,
    metrics_registry: CollectorRegistry | None = None,
    extra_args: list[str] | None = None,
) -> RoundController:
    """Runs in child processes on this machine; `metrics_registry` receives the round metrics
    (pass the gateway's registry to serve them on its `/metrics`)."""
    from fedpersona.trainer.rounds.controller import InProcessRounds
    from fedpersona.trainer.rounds.metrics import TrainerMetrics

    return InProcessRounds(
        home,
        runs_dir=runs_dir,
        metrics=TrainerMetrics(registry=metrics_registry),
        extra_args=extra_args or (),
    )


def remote(url: str, *, admin_key: str, timeout_s: float = 30.0) -> RoundController:
    """A client of the `/admin/rounds` collection at `url` (e.g.
    `http://fedpersona-trainer:8090/admin/rounds`), authenticated with the admin key."""
    from fedpersona.trainer.rounds.remote import RemoteRounds

    return RemoteRounds(url, admin_key=admin_key, timeout_s=timeout_s)
