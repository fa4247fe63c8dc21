"""`fedpersona serve`: run the gateway with uvicorn, and by default the vLLM engine it fronts.

Without `--engine-url` (and `FEDPERSONA_ENGINE__URL`) the gateway supervises its own vLLM child
on loopback (`fedpersona.service.engine.supervisor`), started and stopped by the app's lifespan;
with a URL it
talks to a separately run engine (the Helm chart's layout). `/admin/rounds` is served through
the trainer's round-controller interface (`fedpersona.trainer.rounds.interface`, the only part
of the trainer the gateway imports): in-process (training runs in child processes here) unless
`FEDPERSONA_ROUNDS_URL` names a trainer pod to forward to; `--no-rounds` turns it off.

Two ports: the gateway's (`--port`, default 8000, the only one clients use) and the supervised
vLLM's on loopback (`--engine-port`, default 8100). Before anything starts, `preflight` refuses a
missing model ("run `fedpersona models bootstrap`") and an engine port held by another process;
a vLLM that cannot start ends `serve` (exit 1) with the cause and the fix (`engine_fix`) instead
of leaving a gateway that answers 503 forever.

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
from fedpersona.adapters.home import Home
from fedpersona.adapters.manifest import manifest_path
from fedpersona.service.db import DatabaseError
from fedpersona.service.engine.config import EngineSettings
from fedpersona.service.engine.placement import Placement, keep_gateway_off, plan
from fedpersona.service.engine.supervisor import port_in_use
from fedpersona.service.http.server import uvicorn_config
from fedpersona.service.metrics import Metrics
from fedpersona.service.settings import Settings
from fedpersona.trainer.rounds import interface as rounds
from fedpersona.trainer.rounds.interface import RoundController
from pydantic import ValidationError

# Named explicitly: as `python -m fedpersona.service.commands.serve` this module's __name__ is
# "__main__".
logger = logging.getLogger("fedpersona.service.commands.serve")


def _default(name: str) -> object:
    return Settings.model_fields[name].default


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--home",
        type=Path,
        help=f"fedpersona home (default: {_default('home')}; env FEDPERSONA_HOME)",
    )
    parser.add_argument(
        "--host",
        help=f"address the gateway listens on (default: {_default('host')}; env FEDPERSONA_HOST)",
    )
    parser.add_argument(
        "--port", type=int, help=f"gateway port (default: {_default('port')}; env FEDPERSONA_PORT)"
    )
    parser.add_argument(
        "--engine-port",
        type=int,
        help="port of the supervised vLLM on loopback (default: "
        f"{EngineSettings.model_fields['port'].default}; env FEDPERSONA_ENGINE__PORT)",
    )
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
    engine_updates: dict[str, Any] = {}
    if getattr(args, "engine_url", None):
        engine_updates["url"] = args.engine_url
    if getattr(args, "engine_port", None) is not None:
        engine_updates["port"] = args.engine_port
    if engine_updates:
        # Validated like the environment would be (a port out of range is refused).
        engine = EngineSettings.model_validate({**settings.engine.model_dump(), **engine_updates})
        settings = settings.model_copy(update={"engine": engine})
    return settings


def preflight(settings: Settings) -> str | None:
    """What would make the supervised engine fail for sure, said with the fix; None if nothing.

    Checked before vLLM (and torch) start: a model directory without a model, and an engine
    port another process listens on."""
    if not settings.engine.supervised:
        return None
    model_dir = (settings.engine.model_dir or Home(settings.home).large_model).resolve()
    if settings.engine.served_model_name is None and not manifest_path(model_dir).is_file():
        what = "no model directory" if not model_dir.is_dir() else "no fedpersona model"
        return (
            f"{what} at {model_dir}: run `fedpersona models bootstrap` (or `fedpersona models "
            "import SOURCE`), or point FEDPERSONA_ENGINE__MODEL_DIR at a model"
        )
    host, port = settings.engine.host, settings.engine.port
    if port_in_use(host, port):
        return (
            f"the engine port {host}:{port} is in use by another process (another "
            "`fedpersona serve`, or a vLLM left running?): choose a free one with "
            "`--engine-port N` (env FEDPERSONA_ENGINE__PORT)"
        )
    return None


# Known causes in vLLM's log (its last lines) -> what the operator should do. vLLM is another
# process: its log is all there is to go by.
_FIXES: tuple[tuple[str, str], ...] = (
    (
        "is greater than the derived max_model_len",
        "set FEDPERSONA_ENGINE__MAX_MODEL_LEN at or below the model's max_position_embeddings "
        "(or leave it unset: it follows the model)",
    ),
    (
        "less than desired CPU memory utilization",
        "lower FEDPERSONA_ENGINE__GPU_MEMORY_UTILIZATION (e.g. 0.15) or free memory",
    ),
    (
        "Unsupported CPU attention configuration",
        "the CPU build needs head_dim 64 or more: serve another model",
    ),
    ("Address already in use", "choose a free engine port: `--engine-port N`"),
    ("already in use by another process", "choose a free engine port: `--engine-port N`"),
    ("No module named 'vllm'", "install the engine: `make install` (the cpu or gpu extra)"),
    ("out of memory", "lower FEDPERSONA_ENGINE__KV_CACHE_GIB or FEDPERSONA_ENGINE__MAX_LORAS"),
)


def engine_fix(failure: str) -> str:
    """The operator's next step for a failed engine start, from the failure and vLLM's log."""
    for needle, fix in _FIXES:
        if needle in failure:
            return fix
    return "read the engine log named above; `fedpersona engine` prints the exact command"


def build_supervisor(settings: Settings, placement: Placement | None = None) -> Any:
    """The embedded engine's supervisor (None when an engine URL is configured); with a
    `placement`, vLLM runs on `placement.engine`, not on the CPUs the gateway keeps to."""
    if not settings.engine.supervised:
        return None
    from fedpersona.service.engine.config import build_launch
    from fedpersona.service.engine.supervisor import EngineSupervisor

    launch = build_launch(
        settings.engine,
        home=settings.home,
        store_dir=settings.store_path,
        cpus=placement.engine if placement is not None else None,
    )
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


NO_ADMIN_KEY_WARNING = (
    "FEDPERSONA_ADMIN_KEY is not set: the admin API (/admin/users, /admin/rounds) answers 403. "
    "Set it (a random string of 24+ characters) in the environment to use them."
)


def build_app(settings: Settings, *, rounds: bool = True, supervisor: Any = None) -> Any:
    """The gateway app; `supervisor` defaults to `build_supervisor(settings)`."""
    # Imported here so that bad settings fail fast, before torch and friends load.
    from fedpersona.service.engine.client import EngineClient
    from fedpersona.service.http.app import create_app

    if supervisor is None:
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
    if not settings.admin_enabled:
        logger.warning("%s", NO_ADMIN_KEY_WARNING)
    problem = preflight(settings)
    if problem is not None:
        logger.error("%s", problem)
        return 2
    placement = None
    if settings.engine.supervised and settings.engine.cpu_cores is not None:
        try:
            placement = plan(settings.engine.cpu_cores)
        except ValueError as e:
            logger.error("%s", e)
            return 2
        keep_gateway_off(placement)  # before any thread starts: they inherit it
    try:
        supervisor = build_supervisor(settings, placement)
        app = build_app(settings, rounds=not args.no_rounds, supervisor=supervisor)
    except (ValueError, DatabaseError) as e:
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
    server = uvicorn.Server(uvicorn_config(app, settings))
    failures: list[str] = []
    if supervisor is not None:

        def stop_serving(reason: str) -> None:
            failures.append(reason)
            server.should_exit = True

        supervisor.on_failure(stop_serving)
    server.run()
    if failures:
        logger.error(
            "fedpersona serve stopped: the engine cannot start. Fix: %s", engine_fix(failures[0])
        )
        return 1
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
