"""`fedpersona trainer`: the round controller's HTTP API (the trainer Deployment in Helm).

    fedpersona trainer --home DIR [--host 0.0.0.0 --port 8090] [--superlink]

Routes (admin key as `Authorization: Bearer <FEDPERSONA_ADMIN_KEY>`):
    POST /admin/rounds          body: a RoundSpec, `{}` for defaults (422 if invalid)
                                -> 202 + the queued run;
                                409 while one runs, 400 for a user without a silo
    GET  /admin/rounds          every run, oldest first
    GET  /admin/rounds/{id}     one run: state, progress, per-round metrics, error
    GET  /health, /ready        liveness / readiness (no key)
    GET  /metrics               Prometheus: the trainer registry (no per-user labels)

Rounds run in child processes (`fedpersona.trainer.rounds.controller.RoundController`). With
`--superlink` this command
also supervises a `flower-superlink` (Deployment Engine) on the given ports; in Helm the
SuperLink runs as its own container instead. Settings come from flags or `FEDPERSONA_*`
environment variables, built once in `run`.
"""

from __future__ import annotations

import argparse
import hmac
import logging
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request, Response, status
from fastapi.responses import JSONResponse
from fedpersona.trainer.errors import NoSilo
from fedpersona.trainer.rounds.controller import (
    RoundBusy,
    RoundController,
    RoundSpec,
    RunNotFound,
    RunStatus,
)
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger(__name__)

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


class TrainerSettings(BaseSettings):
    """The trainer API process's settings (env prefix FEDPERSONA_, flags win)."""

    model_config = SettingsConfigDict(env_prefix="FEDPERSONA_", extra="ignore")

    home: Path = Path(".fedpersona")
    host: str = "127.0.0.1"
    port: int = Field(default=8090, ge=1, le=65535)
    admin_key: SecretStr = SecretStr("")
    cpus: int | None = None
    superlink: bool = False
    superlink_host: str = "127.0.0.1"
    fleet_port: int = 9092
    serverappio_port: int = 9091
    control_port: int = 9093

    def check(self) -> None:
        key = self.admin_key.get_secret_value()
        if self.host not in _LOOPBACK and len(key) < 16:
            raise ValueError(
                "admin_key: set FEDPERSONA_ADMIN_KEY (16+ characters) before listening on "
                f"{self.host}; without it only loopback is allowed"
            )


def create_app(controller: RoundController, *, admin_key: str) -> FastAPI:
    """The FastAPI app over `controller`; `admin_key=""` leaves the routes open (loopback)."""

    def require_admin(request: Request) -> None:
        if not admin_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), admin_key.encode()
        ):
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or wrong admin key")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        controller.close()  # stop a run in progress with the process, never orphan it

    app = FastAPI(title="fedpersona trainer", lifespan=lifespan)
    admin = [Depends(require_admin)]

    @app.exception_handler(RoundBusy)
    async def busy(_: Request, e: RoundBusy) -> JSONResponse:
        return JSONResponse({"error": {"message": str(e), "code": "round_busy"}}, status_code=409)

    @app.post("/admin/rounds", status_code=202, dependencies=admin)
    def start(spec: RoundSpec) -> RunStatus:
        try:
            run_id = controller.start(spec)
        except NoSilo as e:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, str(e)) from e
        return controller.get(run_id)

    @app.get("/admin/rounds", dependencies=admin)
    def list_runs() -> list[RunStatus]:
        return controller.list()

    @app.get("/admin/rounds/{run_id}", dependencies=admin)
    def get_run(run_id: str) -> RunStatus:
        try:
            return controller.get(run_id)
        except RunNotFound as e:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(e)) from e

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


def build_settings(args: argparse.Namespace) -> TrainerSettings:
    flags = {
        "home": args.home,
        "host": args.host,
        "port": args.port,
        "cpus": args.cpus,
        "superlink": args.superlink,
        "fleet_port": args.fleet_port,
        "control_port": args.control_port,
        "serverappio_port": args.serverappio_port,
    }
    settings = TrainerSettings(**{k: v for k, v in flags.items() if v is not None})
    settings.check()
    return settings


def run(args: argparse.Namespace) -> int:
    import uvicorn
    from fedpersona.trainer.flower.deployment import SuperLinkAddresses, flwr_env, superlink_command

    try:
        settings = build_settings(args)
    except (ValidationError, ValueError) as e:
        log.error("%s", e)
        return 2
    home = settings.home.resolve()
    extra = ["--cpus", str(settings.cpus)] if settings.cpus else []
    controller = RoundController(home, extra_args=extra)
    superlink: subprocess.Popen[bytes] | None = None
    if settings.superlink:
        addresses = SuperLinkAddresses.on(
            settings.superlink_host,
            fleet=settings.fleet_port,
            serverappio=settings.serverappio_port,
            control=settings.control_port,
        )
        command = superlink_command(addresses, database=home / "superlink.db")
        log.info("starting %s", " ".join(command))
        superlink = subprocess.Popen(command, env=flwr_env(home / "flwr"))
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
