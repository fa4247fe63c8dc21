"""`fedpersona serve`: run the gateway with uvicorn, and by default the vLLM engine it fronts.

Without `--engine-url` (and `FEDPERSONA_ENGINE__URL`) the gateway supervises its own vLLM child
on loopback (`fedpersona.service.engine.supervisor`), started and stopped by the app's lifespan;
with a URL it
talks to a separately run engine (the Helm chart's layout). `/admin/rounds` is served through
the trainer's round-controller interface (`fedpersona.trainer.rounds.interface`, the only part
of the trainer the gateway imports): in-process (training runs in child processes here) unless
`FEDPERSONA_ROUNDS_URL` names a trainer pod to forward to; `--no-rounds` turns it off.

Shutdown on SIGTERM/SIGINT: uvicorn stops accepting connections and lets requests in flight
(streams included) finish for up to `FEDPERSONA_SHUTDOWN_GRACE_S`; then the lifespan drains and
stops vLLM (SIGTERM, then SIGKILL of its process group).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import uvicorn
from fedpersona.service.http.server import uvicorn_config
from fedpersona.service.metrics import Metrics
from fedpersona.service.settings import Settings
from fedpersona.trainer.rounds import interface as rounds
from fedpersona.trainer.rounds.interface import RoundController
from pydantic import ValidationError

# Named explicitly: as `python -m fedpersona.service.commands.serve` this module's __name__ is
# "__main__".
logger = logging.getLogger("fedpersona.service.commands.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", type=Path, help="fedpersona home (env FEDPERSONA_HOME)")
    parser.add_argument("--host", help="address the gateway listens on (env FEDPERSONA_HOST)")
    parser.add_argument("--port", type=int, help="gateway port (env FEDPERSONA_PORT)")
    parser.add_argument(
        "--engine-url",
        help="use a running vLLM server at this URL instead of starting one "
        "(env FEDPERSONA_ENGINE__URL)",
    )
    parser.add_argument(
        "--no-rounds", action="store_true", help="do not offer /admin/rounds (no trainer here)"
    )


def build_settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for field in ("home", "host", "port"):
        value = getattr(args, field, None)
        if value is not None:
            overrides[field] = value
    settings = Settings(**overrides)
    if getattr(args, "engine_url", None):
        engine = settings.engine.model_copy(update={"url": args.engine_url})
        settings = settings.model_copy(update={"engine": engine})
    return settings


def build_supervisor(settings: Settings) -> Any:
    """The embedded engine's supervisor (None when an engine URL is configured)."""
    if not settings.engine.supervised:
        return None
    from fedpersona.service.engine.config import build_launch
    from fedpersona.service.engine.supervisor import EngineSupervisor

    launch = build_launch(settings.engine, home=settings.home, store_dir=settings.store_path)
    return EngineSupervisor(
        launch,
        log_path=settings.engine_log,
        ready_timeout_s=settings.engine.ready_timeout_s,
        progress=lambda message: logger.info("engine: %s", message),
    )


def build_round_controller(settings: Settings, metrics: Metrics) -> RoundController:
    """Remote when `rounds_url` is set (the admin key authenticates this gateway to the trainer);
    else in-process, its round metrics joining the gateway's `/metrics`."""
    if settings.rounds_url:
        return rounds.remote(settings.rounds_url, admin_key=settings.admin_key.get_secret_value())
    return rounds.in_process(
        settings.home, runs_dir=settings.runs_path, metrics_registry=metrics.registry
    )


def build_app(settings: Settings, *, rounds: bool = True) -> Any:
    # Imported here so that bad settings fail fast, before torch and friends load.
    from fedpersona.service.engine.client import EngineClient
    from fedpersona.service.http.app import create_app

    supervisor = build_supervisor(settings)
    engine = EngineClient(
        supervisor.launch.base_url if supervisor is not None else settings.engine.base_url,
        api_key=supervisor.launch.api_key if supervisor is not None else settings.engine_key,
        request_timeout_s=settings.engine.request_timeout_s,
        gate=supervisor.check_available if supervisor is not None else None,
    )
    base_model = supervisor.launch.served_model_name if supervisor is not None else None
    metrics = Metrics()
    return create_app(
        settings,
        engine=engine,
        supervisor=supervisor,
        base_model=base_model,
        metrics=metrics,
        rounds_controller=build_round_controller(settings, metrics) if rounds else None,
    )


def run(args: argparse.Namespace) -> int:
    try:
        settings = build_settings(args)
    except ValidationError as e:
        logger.error("invalid settings:\n%s", e)
        return 2
    try:
        app = build_app(settings, rounds=not args.no_rounds)
    except ValueError as e:
        logger.error("%s", e)
        return 2
    # httpx logs every engine request at INFO; the access log already has one line per request.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logger.info(
        "gateway on http://%s:%d (engine: %s)",
        settings.host,
        settings.port,
        "supervised" if settings.engine.supervised else settings.engine.url,
    )
    uvicorn.Server(uvicorn_config(app, settings)).run()
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m fedpersona.service.commands.serve`: the same as `fedpersona serve`."""
    parser = argparse.ArgumentParser(prog="fedpersona serve")
    add_arguments(parser)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
