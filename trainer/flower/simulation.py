"""Run a fedpersona training run in Flower's Simulation Engine (the embedded default).

One virtual SuperNode per user (`partition-id` i trains `RunConfig.users[i]` on
`<home>/silos/<user>`), the ServerApp in a thread of this process, ClientApps in Ray actors.
The run record under `<home>/runs/` is the result: the ServerApp writes it round by round, and
this module marks it failed if the engine dies before the ServerApp could.

It knows how to start the engine; the apps themselves are `fedpersona.trainer.flower.apps`'s.
"""

from __future__ import annotations

import logging
import os

from fedpersona.trainer.flower.apps import (
    MethodFactory,
    build_client_app,
    build_server_app,
    default_method,
)
from fedpersona.trainer.flower.runconfig import RunConfig
from fedpersona.trainer.flower.strategy import MessageObserver
from fedpersona.trainer.rounds.records import RunRecords, RunState, RunStatus, utcnow
from flwr.simulation import run_simulation

log = logging.getLogger(__name__)


def simulate(
    config: RunConfig,
    *,
    method_factory: MethodFactory = default_method,
    observer: MessageObserver | None = None,
    cpus: int | None = None,
) -> RunStatus:
    """Run `config` to the end; return its final record (state succeeded or failed).

    The record must exist (`RunRecords.create`); `cpus` caps Ray's CPUs (default: all), and
    each ClientApp takes one, so at most `cpus` users train at once.
    """
    if not config.users:
        raise ValueError("a simulation needs the run config to name its users")
    records = RunRecords(config.runs_dir)
    # Flower's telemetry would try the network on every run; this machine has none to spare.
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    run_config = config.to_flower()
    num_cpus = max(1, cpus or os.cpu_count() or 1)
    backend_config = {
        "init_args": {"num_cpus": num_cpus, "include_dashboard": False},
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
    }
    try:
        run_simulation(
            server_app=build_server_app(
                method_factory=method_factory, observer=observer, run_config=run_config
            ),
            client_app=build_client_app(method_factory=method_factory, run_config=run_config),
            num_supernodes=len(config.users),
            backend_name="ray",
            backend_config=backend_config,  # type: ignore[arg-type]
        )
    except Exception as e:
        status = records.read(config.run_id)
        if not status.done:
            records.update(
                config.run_id,
                state=RunState.failed,
                finished_at=utcnow(),
                error=f"{type(e).__name__}: {e}",
            )
        log.error("simulation of run %s failed: %s", config.run_id, e)
    return records.read(config.run_id)
