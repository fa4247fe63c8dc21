"""Running fedpersona on Flower's Deployment Engine: a SuperLink, one SuperNode per user/device.

The same ServerApp and ClientApp as in simulation (`fedpersona.trainer.flower.apps`), packaged as
the Flower
App in `trainer/flower/flwr_app/` and submitted with `flwr run`. This module builds the command
lines
and the Flower CLI's configuration; it starts nothing by itself except in `submit`.

    flower-superlink --enable-supernode-auth --ssl-ca-certfile ca.crt --ssl-certfile server.crt
                     --ssl-keyfile server.key --fleet-api-address H:P
                     --serverappio-api-address H:P --control-api-address H:P
    flwr supernode register alice.pub fedpersona --format json       # -> node id (operator)
    flower-supernode --root-certificates ca.crt --auth-supernode-private-key alice
                     --superlink H:FLEET --clientappio-api-address H:P
                     --node-config "user='alice' silo='/data/alice'"
    flwr run trainer/flower/flwr_app fedpersona --run-config <overrides.toml> --stream

A SuperNode's node config says whom it trains for (`user`, `silo`, and optionally `store` and
`base-model` where that device sees them elsewhere). Traps this module handles: the SuperLink
starts `flower-superexec` from `PATH` (so the venv's `bin` must be on it), the processes the
SuperNodes start must be able to import `fedpersona` (installed), and the `flwr`
CLI keeps its configuration under `$FLWR_HOME` (default `~/.flwr`), which `flwr_env` points at
a directory of ours.

TLS and SuperNode authentication are the default: only nodes whose public key the operator
registered can join, and the run config's `node-bindings` (written by `register_node`) says which
users each authenticated node id may train for. `tls=None` (plain gRPC, any node may join) is
for loopback tests of the plumbing only.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from fedpersona.trainer.errors import ConfigError
from fedpersona.trainer.flower.identity import (
    NodeBinding,
    NodeBindings,
    TlsFiles,
    public_key_fingerprint,
)
from fedpersona.trainer.flower.runconfig import RunConfig, Scalar
from fedpersona.trainer.rounds.records import RunRecords, RunStatus

log = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parent / "flwr_app"
CONNECTION = "fedpersona"


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
    """The environment for Flower processes: venv bin on PATH, own FLWR_HOME.

    fedpersona itself must be installed (editable or as a wheel) where those processes run:
    nothing of the checkout goes on PYTHONPATH, which would expose its folders under bare names.
    """
    env = dict(os.environ if base is None else base)
    env["PATH"] = f"{bin_dir()}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_HOME"] = str(flwr_home)
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    return env


def superlink_command(
    addresses: SuperLinkAddresses,
    *,
    database: Path | None = None,
    tls: TlsFiles | None = None,
) -> list[str]:
    """The SuperLink with TLS and SuperNode authentication (`tls=None`: plain, no auth)."""
    security = (
        [
            "--enable-supernode-auth",
            "--ssl-ca-certfile",
            str(tls.ca_cert),
            "--ssl-certfile",
            str(tls.server_cert),
            "--ssl-keyfile",
            str(tls.server_key),
        ]
        if tls is not None
        else ["--insecure"]
    )
    command = [
        str(bin_dir() / "flower-superlink"),
        *security,
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
    root_certificates: Path | None = None,
    private_key: Path | None = None,
) -> list[str]:
    """A SuperNode for `user`; with `root_certificates` and `private_key`, over TLS, signed."""
    node_config = {"user": user, "silo": str(silo)}
    if store is not None:
        node_config["store"] = str(store)
    if base_model is not None:
        node_config["base-model"] = str(base_model)
    if root_certificates is not None:
        security = ["--root-certificates", str(root_certificates)]
        if private_key is not None:
            security += ["--auth-supernode-private-key", str(private_key)]
    else:
        security = ["--insecure"]
    return [
        str(bin_dir() / "flower-supernode"),
        *security,
        "--superlink",
        superlink_fleet,
        "--clientappio-api-address",
        clientappio,
        "--node-config",
        " ".join(f"{k}={_toml_value(v)}" for k, v in node_config.items()),
    ]


def write_connection(
    flwr_home: Path, *, control: str, root_certificates: Path | None = None
) -> Path:
    """Write `$FLWR_HOME/config.toml` naming the SuperLink's control API as the default."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    security = (
        f"root-certificates = {_toml_value(str(root_certificates))}\n"
        if root_certificates is not None
        else "insecure = true\n"
    )
    path.write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{control}"\n{security}',
        encoding="utf-8",
    )
    return path


def register_node(
    public_key: Path,
    *,
    control: str,
    flwr_home: Path,
    root_certificates: Path | None,
    users: tuple[str, ...],
    bindings_file: Path,
    name: str = "",
) -> NodeBinding:
    """Register `public_key` on the SuperLink and bind the node id it gets to `users`.

    The one operator step that makes a device a participant: the SuperLink will accept the
    node's signed calls, and the ServerApp (reading `bindings_file`) its replies for `users`.
    """
    write_connection(flwr_home, control=control, root_certificates=root_certificates)
    env = flwr_env(flwr_home)
    env["HOME"] = str(flwr_home.parent)
    command = [
        str(bin_dir() / "flwr"),
        "supernode",
        "register",
        str(public_key),
        CONNECTION,
        "--format",
        "json",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    node_id = _node_id(done.stdout)
    if done.returncode != 0 or node_id is None:
        raise ConfigError(
            f"registering {public_key} failed ({done.returncode}): "
            f"{(done.stdout + done.stderr).strip()[-500:]}"
        )
    bindings = NodeBindings.load(bindings_file) if bindings_file.exists() else NodeBindings()
    binding = NodeBinding(
        node_id=node_id,
        users=tuple(users),
        name=name or public_key.stem,
        public_key_sha256=public_key_fingerprint(public_key),
    )
    bindings.bind(binding)
    bindings.save(bindings_file)
    log.info("registered node %d for %s", node_id, ", ".join(users))
    return binding


def _node_id(output: str) -> int | None:
    for line in reversed(output.strip().splitlines()):
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and isinstance(data.get("node-id"), int):
            return int(data["node-id"])
    try:
        data = json.loads(output[output.index("{") :])
        return int(data["node-id"])
    except (ValueError, KeyError, TypeError):
        return None


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
    root_certificates: Path | None = None,
) -> RunStatus:
    """Run `config` on the SuperLink at `control` with `flwr run --stream`; return its record.

    The record must exist (`RunRecords.create`); the ServerApp, wherever the SuperLink runs it,
    writes to the run's `runs_dir`, which must therefore be shared with this process.
    """
    write_connection(flwr_home, control=control, root_certificates=root_certificates)
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
