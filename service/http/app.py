"""The gateway app factory: `create_app(settings, ...)` wires services, routes and error handling.

Nothing is built at import time. Tests pass fakes (`engine=`, `adapters=`,
`rounds_controller=`); the `serve` command passes a round controller from
`fedpersona.trainer.rounds.interface` (in-process or remote) and lets the factory build the
engine client and adapter manager from settings. Every error leaves as the OpenAI envelope
`{"error": {"message", "type", "param", "code"}}` with the status its `GatewayError` names;
FastAPI's 422 for a malformed body becomes a 400 like OpenAI's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fedpersona.adapters import AdapterStore
from fedpersona.adapters.manifest import model_name
from fedpersona.service.db_ratelimit import rate_limiter_for
from fedpersona.service.errors import BadRequest, GatewayError, error_envelope
from fedpersona.service.http.auth import gateway_admin_guard
from fedpersona.service.http.chat import ChatConfig, ChatService
from fedpersona.service.http.limits import InFlightLimiter
from fedpersona.service.http.middleware import AuthenticateFirst, BodyLimits
from fedpersona.service.http.routes import admin, chat, health, models, rounds
from fedpersona.service.metrics import Metrics
from fedpersona.service.registry import Registry
from fedpersona.service.settings import Settings
from fedpersona.service.state import Engine, Services
from fedpersona.trainer.rounds.interface import RoundController
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from fedpersona.service.engine.client import EngineClient

logger = logging.getLogger(__name__)


def resolve_base_model(settings: Settings) -> str:
    """The base model's served name: configured, else read from the local model dir."""
    if settings.engine.served_model_name:
        return settings.engine.served_model_name
    model_dir = settings.large_model_dir
    if not (Path(model_dir) / "fedpersona.json").is_file():
        raise ValueError(
            f"cannot tell the base model's name: {model_dir}/fedpersona.json is missing; set "
            "FEDPERSONA_ENGINE__SERVED_MODEL_NAME or run `fedpersona models bootstrap`"
        )
    return model_name(Path(model_dir))


def create_app(
    settings: Settings,
    *,
    engine: Engine | None = None,
    adapters: Any | None = None,
    store: AdapterStore | None = None,
    registry: Registry | None = None,
    rounds_controller: RoundController | None = None,
    base_model: str | None = None,
    metrics: Metrics | None = None,
    supervisor: Any | None = None,
) -> FastAPI:
    """Build the gateway. With a `supervisor` (embedded mode) the app starts vLLM when it starts
    and stops it, after requests in flight, when it shuts down."""
    base_model = base_model or resolve_base_model(settings)
    if base_model == settings.personal_alias:
        raise ValueError(f"the personal alias {settings.personal_alias!r} equals the base model")
    metrics = metrics or Metrics()
    if store is None:  # read-only: replicas share the volume; clean-up is the publishers' job
        settings.store_path.mkdir(parents=True, exist_ok=True)
        store = AdapterStore(
            settings.store_path, max_rank=settings.adapter_max_rank, read_only=True
        )
    registry = registry or Registry(
        settings.registry_location,
        default_alpha=settings.proxy_alpha_default,
        pool_size=settings.database_pool_size,
    )
    reconcile = adapters is None and not settings.engine.supervised
    unused: Engine | None = None
    if settings.replica_routing and adapters is None:
        from fedpersona.service.engine.wiring import build_replica_set

        if engine is not None:
            unused = engine  # built for engine.url by a caller that does not know of replicas
        engine = adapters = build_replica_set(settings, store=store, metrics=metrics)
    if engine is None:
        from fedpersona.service.engine.client import EngineClient

        engine = EngineClient(
            settings.engine.base_url,
            api_key=settings.engine_key,
            request_timeout_s=settings.engine.request_timeout_s,
        )
    if adapters is None:
        from fedpersona.service.engine.wiring import build_adapter_manager

        # An engine handed in without an adapter manager must also load and unload LoRAs
        # (an EngineClient, or a test double with the same methods).
        lora_engine = cast("EngineClient", engine)
        adapters = build_adapter_manager(settings, store=store, engine=lora_engine, metrics=metrics)
    chat_service = ChatService(
        config=ChatConfig(
            personal_alias=settings.personal_alias,
            base_model=base_model,
            max_model_len=settings.engine.for_model(
                settings.large_model_dir if settings.engine.supervised else None
            ).max_model_len
            or 1024,
            max_bytes_per_token=settings.max_bytes_per_token,
            proxy_tuning=settings.proxy_tuning,
            max_messages=settings.max_messages,
            min_tokens_per_message=settings.min_tokens_per_message,
        ),
        engine=engine,
        adapters=adapters,
        store=store,
        metrics=metrics,
    )
    services = Services(
        settings=settings,
        registry=registry,
        store=store,
        engine=engine,
        adapters=adapters,
        metrics=metrics,
        limiter=rate_limiter_for(settings, registry.database),
        chat=chat_service,
        base_model=base_model,
        created=int(time.time()),
        supervisor=supervisor,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        watcher: asyncio.Task[None] | None = None
        if reconcile:  # a shared, separately run engine: adopt what it already holds
            await adapters.start()
        if supervisor is not None:
            reset = getattr(adapters, "reset", None)
            if reset is not None:
                supervisor.on_restart(reset)
            await supervisor.start()
            watcher = asyncio.create_task(_report_engine_start(supervisor))
            start_preloading = getattr(adapters, "start_preloading", None)
            if start_preloading is not None:  # warm the engine as soon as it answers
                start_preloading()
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
            if rounds_controller is not None:
                # Stops a training run in progress: its child would outlive us otherwise.
                await asyncio.to_thread(rounds_controller.close)
            if supervisor is not None:
                wait_idle = getattr(engine, "wait_idle", None)
                await supervisor.stop(settings.shutdown_grace_s, wait_idle=wait_idle)
            close = getattr(adapters, "aclose", None)
            if close is not None:
                await close()
            await engine.aclose()  # the app owns the engine client it was given
            if unused is not None:
                await unused.aclose()

    app = FastAPI(
        title="fedpersona gateway",
        summary="OpenAI-compatible chat with each user's own federated-trained adapter",
        lifespan=lifespan,
        docs_url="/docs" if settings.docs else None,
        redoc_url="/redoc" if settings.docs else None,
        openapi_url="/openapi.json" if settings.docs else None,
    )
    app.state.services = services
    app.state.admin_guard = gateway_admin_guard(services)
    app.state.rounds = rounds_controller
    app.state.in_flight = InFlightLimiter(settings.max_in_flight_per_user)
    install_error_handlers(app)
    app.router.routes.append(chat.route())
    for router in (models.router, health.router, admin.router, rounds.router):
        app.include_router(router)
    _document(app, chat.documented)
    # Added innermost first: metrics see everything, credentials are checked before the body.
    app.add_middleware(
        BodyLimits, max_bytes=settings.max_request_bytes, timeout_s=settings.body_timeout_s
    )
    app.add_middleware(
        AuthenticateFirst,
        authenticate_user=registry.authenticate,
        check_admin=app.state.admin_guard.check,
        metrics_key=settings.metrics_key.get_secret_value(),
        authenticate_inline=registry.database.quick_reads,
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics, access_log=settings.access_log)
    return app


def _document(app: FastAPI, *routers: APIRouter) -> None:
    """Describe routes served as plain ASGI apps (which FastAPI's schema skips) in
    `/openapi.json`, from routers that document them without being mounted."""
    described = [route for router in routers for route in router.routes]

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                routes=[*app.routes, *described],
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


async def _report_engine_start(supervisor: Any) -> None:
    """Log when the supervised engine is ready, or loudly why it never will be."""
    try:
        await supervisor.wait_ready()
    except Exception as e:  # EngineStartFailed, or anything the supervisor raised
        logger.error("the inference engine could not start: %s", e)
        return
    logger.info("inference engine ready at %s", supervisor.launch.base_url)


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as the OpenAI envelope (shared with `fedpersona.trainer_api`)."""

    @app.exception_handler(GatewayError)
    async def _gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
        return JSONResponse(exc.envelope(), status_code=exc.status, headers=exc.headers())

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation(exc)
        error = BadRequest(message, param=param)
        return JSONResponse(error.envelope(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if exc.status_code < 500 else "internal_error"
        body = error_envelope(str(exc.detail), type_=type_, code=str(exc.status_code))
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        body = error_envelope("Internal server error.", type_="internal_error")
        return JSONResponse(body, status_code=500)


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable message naming the first offending field, like OpenAI's 400s."""
    errors = exc.errors()
    if not errors:
        return "Invalid request body.", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    message = str(first.get("msg", "invalid value"))
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON.", None
    if param:
        message = f"{param}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return message, param


access_logger = logging.getLogger("fedpersona.access")


class MetricsMiddleware:
    """Counts requests by route template and status, times them to the last body byte, and
    writes the access log line then (path without its query string, status, duration)."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics, access_log: bool = True) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            seconds = time.perf_counter() - started
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(template, scope.get("method", ""), str(status)).inc()
            self.metrics.request_seconds.labels(template).observe(seconds)
            if self.access_log and access_logger.isEnabledFor(logging.INFO):
                client = scope.get("client")
                access_logger.info(
                    '%s - "%s %s HTTP/%s" %d %.1f ms',
                    f"{client[0]}:{client[1]}" if client else "-",
                    scope.get("method", ""),
                    scope.get("path", ""),  # never the query string: it may hold a key
                    scope.get("http_version", ""),
                    status,
                    seconds * 1000,
                )
