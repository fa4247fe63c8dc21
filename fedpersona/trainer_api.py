"""`fedpersona trainer`: the trainer pod's HTTP API (the trainer Deployment in Helm).

    fedpersona trainer --home DIR [--host 0.0.0.0 --port 8090] [--superlink]
        [--engine deployment --root-certificates ca.crt --node-bindings node-bindings.json]

Routes:
    POST /admin/rounds          body: a RoundSpec, `{}` for defaults -> 202 + the queued run;
                                400 for an invalid spec or a user without a silo, 409 while
                                one runs
    GET  /admin/rounds          every run, oldest first
    GET  /admin/rounds/{id}     one run: state, progress, per-round metrics, error
    GET  /health, /ready        liveness / readiness (no key)
    GET  /metrics               Prometheus: the trainer registry (no per-user labels)

Composed here, in the root package, because it takes from both sides: the gateway's rounds
router, admin guard and error handlers (`fedpersona.service.http`), so that the trainer pod and
the gateway pods answer `/admin/rounds` identically (OpenAI error envelope, same admin-key
rules: `Authorization: Bearer <FEDPERSONA_ADMIN_KEY>`, no key configured = admin API off), over
the trainer's in-process round controller (rounds run in child processes). With `--superlink`
it also supervises a plain-gRPC `flower-superlink` (local development only); in Helm the
SuperLink runs as its own container, with TLS and SuperNode authentication.

Settings are the gateway's `Settings` class (home, runs dir, host, admin key, environment: one
owner for the admin-key rule, which refuses a weak key in production) plus the trainer pod's
own options; flags win over `FEDPERSONA_*` variables.

Where runs train: `--engine simulation` (default) runs Flower's Simulation Engine over the silos
under the home; `--engine deployment` submits each run to the SuperLink's Control API
(`--superlink-host`, `--control-port`) over the connected SuperNodes, with the operator's node
bindings passed to every run (`fedpersona.trainer.rounds.superlink.SuperLinkTarget`). The
Deployment Engine is TLS + SuperNode authentication + bindings, or, only when asked for by
`--insecure-superlink`, plain gRPC; TLS without bindings is refused at start-up.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import Field, ValidationError, model_validator

from fedpersona.service.http.app import install_error_handlers
from fedpersona.service.http.auth import AdminGuard
from fedpersona.service.http.routes import rounds
from fedpersona.service.settings import Settings
from fedpersona.trainer.errors import ConfigError
from fedpersona.trainer.rounds.controller import InProcessRounds
from fedpersona.trainer.rounds.superlink import SuperLinkTarget

log = logging.getLogger(__name__)


class TrainerApiSettings(Settings):
    """The gateway's settings (only home, runs_dir, host, admin_key and environment matter
    here) plus the trainer pod's: its port, training CPUs and an optional SuperLink."""

    port: int = Field(default=8090, ge=1, le=65535)
    cpus: int | None = Field(default=None, ge=1, description="ClientApps training at once")
    superlink: bool = False
    superlink_host: str = "127.0.0.1"
    fleet_port: int = 9092
    serverappio_port: int = 9091
    control_port: int = 9093
    # Not `engine`: the gateway's settings own that name (the vLLM engine).
    rounds_engine: Literal["simulation", "deployment"] = "simulation"
    root_certificates: Path | None = Field(default=None, description="the SuperLink's CA file")
    node_bindings: Path | None = Field(default=None, description="node id -> users (JSON)")
    insecure_superlink: bool = Field(
        default=False, description="deployment over plain gRPC: any node may claim any user"
    )

    @model_validator(mode="after")
    def _check_deployment(self) -> TrainerApiSettings:
        if self.rounds_engine != "deployment":
            return self
        if self.insecure_superlink and self.root_certificates is not None:
            raise ValueError("insecure_superlink and root_certificates exclude each other")
        if not self.insecure_superlink and self.root_certificates is None:
            raise ValueError(
                "engine deployment needs root_certificates (TLS) and node_bindings, or "
                "insecure_superlink to run over plain gRPC"
            )
        if not self.insecure_superlink and self.node_bindings is None:
            raise ValueError(
                "a TLS SuperLink needs node_bindings (`fedpersona nodes register` writes them): "
                "without them an authenticated node could train as any user"
            )
        return self

    def superlink_target(self) -> SuperLinkTarget | None:
        """Where runs go (None: the Simulation Engine on this machine)."""
        if self.rounds_engine != "deployment":
            return None
        return SuperLinkTarget(
            control=f"{self.superlink_host}:{self.control_port}",
            root_certificates=self.root_certificates,
            node_bindings=self.node_bindings,
        )


def create_app(controller: InProcessRounds, *, admin_key: str) -> FastAPI:
    """The trainer pod's app over `controller`; `admin_key=""` turns the admin routes off."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        controller.close()  # stop a run in progress with the process, never orphan it

    app = FastAPI(title="fedpersona trainer", lifespan=lifespan)
    app.state.rounds = controller
    app.state.admin_guard = AdminGuard(key=admin_key)
    install_error_handlers(app)
    app.include_router(rounds.router)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    def ready() -> dict[str, object]:
        return {"status": "ready", "active_run": controller.active()}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(
            generate_latest(controller.metrics.registry), media_type=CONTENT_TYPE_LATEST
        )

    return app


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", type=Path, default=None, help="fedpersona home (FEDPERSONA_HOME)")
    parser.add_argument("--host", default=None, help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="listen port (default 8090)")
    parser.add_argument("--cpus", type=int, default=None, help="ClientApps training at once")
    parser.add_argument(
        "--superlink", action="store_true", default=None, help="also run flower-superlink"
    )
    parser.add_argument("--fleet-port", type=int, default=None)
    parser.add_argument("--control-port", type=int, default=None)
    parser.add_argument("--serverappio-port", type=int, default=None)
    parser.add_argument(
        "--engine",
        choices=("simulation", "deployment"),
        default=None,
        help="where runs train: simulation (silos under --home, default) or deployment "
        "(the SuperLink at --superlink-host:--control-port, over its SuperNodes)",
    )
    parser.add_argument("--superlink-host", default=None, help="the SuperLink's host")
    parser.add_argument(
        "--root-certificates", type=Path, default=None, help="the SuperLink's CA file (TLS)"
    )
    parser.add_argument(
        "--node-bindings",
        type=Path,
        default=None,
        help="node id -> users (`fedpersona nodes register`), passed to every run",
    )
    parser.add_argument(
        "--insecure-superlink",
        action="store_true",
        default=None,
        help="deployment over plain gRPC, no bindings: any node may train as any user",
    )


def build_settings(args: argparse.Namespace) -> TrainerApiSettings:
    flags = {
        "home": args.home,
        "host": args.host,
        "port": args.port,
        "cpus": args.cpus,
        "superlink": args.superlink,
        "fleet_port": args.fleet_port,
        "control_port": args.control_port,
        "serverappio_port": args.serverappio_port,
        "rounds_engine": args.engine,
        "superlink_host": args.superlink_host,
        "root_certificates": args.root_certificates,
        "node_bindings": args.node_bindings,
        "insecure_superlink": args.insecure_superlink,
    }
    return TrainerApiSettings(**{k: v for k, v in flags.items() if v is not None})


def _start_superlink(settings: TrainerApiSettings, home: Path) -> subprocess.Popen[bytes]:
    from fedpersona.trainer.flower.deployment import SuperLinkAddresses, flwr_env, superlink_command

    addresses = SuperLinkAddresses.on(
        settings.superlink_host,
        fleet=settings.fleet_port,
        serverappio=settings.serverappio_port,
        control=settings.control_port,
    )
    command = superlink_command(addresses, database=home / "superlink.db")
    log.info("starting %s", " ".join(command))
    return subprocess.Popen(command, env=flwr_env(home / "flwr"))


def run(args: argparse.Namespace) -> int:
    import uvicorn

    try:
        settings = build_settings(args)
    except ValidationError as e:
        log.error("invalid settings:\n%s", e)
        return 2
    home = settings.home.resolve()
    extra = ["--cpus", str(settings.cpus)] if settings.cpus else []
    try:
        target = settings.superlink_target()
    except ConfigError as e:
        log.error("invalid settings: %s", e)
        return 2
    if target is not None and target.root_certificates is None:
        log.warning("runs go to a plain-gRPC SuperLink: any node may join and claim any user")
    if settings.superlink and target is not None and target.root_certificates is not None:
        # The supervised SuperLink is the local plain-gRPC one (development); a TLS SuperLink
        # with SuperNode authentication runs as its own process (the chart's container).
        log.error("--superlink starts a plain-gRPC SuperLink; it cannot serve --root-certificates")
        return 2
    controller = InProcessRounds(
        home, runs_dir=settings.runs_dir, extra_args=extra, superlink=target
    )
    if not settings.admin_enabled:
        log.warning("FEDPERSONA_ADMIN_KEY is not set: /admin/rounds answers 403")
    superlink = _start_superlink(settings, home) if settings.superlink else None
    try:
        app = create_app(controller, admin_key=settings.admin_key.get_secret_value())
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
    finally:
        if superlink is not None:
            superlink.terminate()
            try:
                superlink.wait(timeout=20)
            except subprocess.TimeoutExpired:
                superlink.kill()
    return 0
