"""`/health` (the process is up), `/ready` (engine reachable, registry and store readable),
`/metrics` (Prometheus text format). No authentication: they reveal no user data."""

from __future__ import annotations

import asyncio
import logging
import os

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from fedpersona.service.http.routes.deps import ServicesDep
from fedpersona.service.metrics import CONTENT_TYPE
from starlette.responses import Response

logger = logging.getLogger(__name__)
router = APIRouter(tags=["operations"])


@router.get("/health", response_model=None)
async def health(services: ServicesDep) -> JSONResponse:
    # Liveness: fails only when restarting this process is the cure, i.e. the supervised engine
    # gave up for good. A starting or restarting engine is a readiness matter.
    supervisor = services.supervisor
    if supervisor is not None and str(supervisor.state) == "failed":
        return JSONResponse({"status": "engine failed"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/ready", response_model=None)
async def ready(services: ServicesDep) -> JSONResponse:
    checks: dict[str, bool] = {}
    supervisor = services.supervisor
    if supervisor is not None and str(supervisor.state) != "ready":
        # vLLM's own /health can answer before the supervisor has seen it (it polls): until
        # then chat answers 503 "starting", so this is not ready either.
        checks["engine"] = False
    else:
        try:
            checks["engine"] = await services.engine.health()
        except Exception:  # a probe answers, whatever the engine client does
            logger.exception("engine health check failed")
            checks["engine"] = False
    try:
        await asyncio.to_thread(services.registry.check)
        checks["registry"] = True
    except Exception:
        logger.exception("registry is not readable")
        checks["registry"] = False
    root = services.store.root
    checks["store"] = root.is_dir() and os.access(root, os.R_OK | os.X_OK)
    ok = all(checks.values())
    body = {"status": "ready" if ok else "not ready", "checks": checks}
    headers = {} if ok else {"Retry-After": "5"}
    return JSONResponse(body, status_code=200 if ok else 503, headers=headers)


@router.get("/metrics", response_model=None)
async def metrics(services: ServicesDep) -> Response:
    return Response(services.metrics.render(), media_type=CONTENT_TYPE)
