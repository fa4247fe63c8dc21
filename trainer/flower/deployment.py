"""Running fedpersona on Flower's Deployment Engine: a SuperLink, one SuperNode per user/device.

The same ServerApp and ClientApp as in simulation (`fedpersona.trainer.flower.apps`), packaged as
the Flower
App in `trainer/flower/flwr_app/` and submitted with `flwr run`. This module builds the command
lines
and the Flower CLI's configuration; it starts nothing by itself except in `submit`.

    flower-superlink --insecure --fleet-api-address H:P --serverappio-api-address H:P
                     --control-api-address H:P
    flower-supernode --insecure --superlink H:FLEET --clientappio-api-address H:P
                     --node-config "user='alice' silo='/data/alice'"
    flwr run trainer/flower/flwr_app fedpersona --run-config <overrides.toml> --stream

A SuperNode's node config says whom it trains for (`user`, `silo`, and optionally `store` and
`base-model` where that device sees them elsewhere). Traps this module handles: the SuperLink
starts `flower-superexec` from `PATH` (so the venv's `bin` must be on it), the processes the
SuperNodes start must be able to import `trainer` (installed, or on `PYTHONPATH`), and the `flwr`
CLI keeps its configuration under `$FLWR_HOME` (default `~/.flwr`), which `flwr_env` points at
a directory of ours.

Insecure (plain gRPC) is for loopback and tests; across machines, use Flower's TLS and SuperNode
authentication flags.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from fedpersona.trainer.flower.runconfig import RunConfig, Scalar
from fedpersona.trainer.rounds.records import RunRecords, RunStatus

log = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parent / "flwr_app"
CONNECTION = "fedpersona"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class SuperLinkAddresses:
    """The three APIs of a SuperLink (host:port each)."""

    fleet: str
    serverappio: str
    control: str

    @classmethod
    def on(cls, host: str, *, fleet: int, serverappio: int, control: int) -> SuperLinkAddresses:
        return cls(
            fleet=f"{host}:{fleet}",
            serverappio=f"{host}:{serverappio}",
            control=f"{host}:{control}",
        )


def bin_dir() -> Path:
    """The folder of this Python's console scripts (flower-superlink, flower-superexec, flwr)."""
    return Path(sys.executable).parent


def flwr_env(flwr_home: Path, *, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for Flower processes: venv bin on PATH, trainer importable, own FLWR_HOME."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = f"{bin_dir()}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p)
    env["FLWR_HOME"] = str(flwr_home)
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    return env


def superlink_command(addresses: SuperLinkAddresses, *, database: Path | None = None) -> list[str]:
    command = [
        str(bin_dir() / "flower-superlink"),
        "--insecure",
        "--fleet-api-address",
        addresses.fleet,
        "--serverappio-api-address",
        addresses.serverappio,
        "--control-api-address",
        addresses.control,
    ]
    if database is not None:
        command += ["--database", str(database)]
    return command


def supernode_command(
    *,
    superlink_fleet: str,
    clientappio: str,
    user: str,
    silo: Path,
    store: Path | None = None,
    base_model: Path | None = None,
) -> list[str]:
    node_config = {"user": user, "silo": str(silo)}
    if store is not None:
        node_config["store"] = str(store)
    if base_model is not None:
        node_config["base-model"] = str(base_model)
    return [
        str(bin_dir() / "flower-supernode"),
        "--insecure",
        "--superlink",
        superlink_fleet,
        "--clientappio-api-address",
        clientappio,
        "--node-config",
        " ".join(f"{k}={_toml_value(v)}" for k, v in node_config.items()),
    ]


def write_connection(flwr_home: Path, *, control: str) -> Path:
    """Write `$FLWR_HOME/config.toml` naming the SuperLink's control API as the default."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{control}"\ninsecure = true\n',
        encoding="utf-8",
    )
    return path


def write_run_config(config: RunConfig, path: Path) -> Path:
    """The run config overrides `flwr run --run-config` reads (a flat TOML file)."""
    lines = [f"{key} = {_toml_value(value)}" for key, value in config.to_flower().items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def submit(
    config: RunConfig,
    *,
    control: str,
    flwr_home: Path,
    timeout: float | None = None,
    log_file: Path | None = None,
) -> RunStatus:
    """Run `config` on the SuperLink at `control` with `flwr run --stream`; return its record.

    The record must exist (`RunRecords.create`); the ServerApp, wherever the SuperLink runs it,
    writes to the run's `runs_dir`, which must therefore be shared with this process.
    """
    write_connection(flwr_home, control=control)
    overrides = write_run_config(config, flwr_home / f"run-{config.run_id}.toml")
    command = [
        str(bin_dir() / "flwr"),
        "run",
        str(APP_DIR),
        CONNECTION,
        "--run-config",
        str(overrides),
        "--stream",
    ]
    log.info("submitting run %s: %s", config.run_id, " ".join(command))
    env = flwr_env(flwr_home)
    env["HOME"] = str(flwr_home.parent)  # the flwr CLI also touches ~ on first use
    with open(log_file or os.devnull, "ab") as out:
        completed = subprocess.run(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=False
        )
    if completed.returncode != 0:
        log.error("flwr run exited with code %d", completed.returncode)
    return RunRecords(config.runs_dir).read(config.run_id)


def _toml_value(value: Scalar | str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string
