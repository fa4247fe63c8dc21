"""`/admin/rounds`: start a federated training run in the background and follow it.

The controller is `fedpersona.trainer.rounds.controller.RoundController` (the trainer's only public
interface), injected
into the app by `fedpersona serve` (tests inject a fake); without one these routes answer 503.
One run at a time: starting another while one runs is a 409.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, status
from fedpersona.service.errors import BadRequest, Conflict, GatewayError, NotFound
from fedpersona.service.http.auth import AdminAccess
from fedpersona.service.http.routes.deps import ServicesDep
from fedpersona.trainer.rounds.controller import RoundBusy, RoundSpec, RunNotFound, RunStatus

router = APIRouter(prefix="/admin/rounds", tags=["rounds"], dependencies=[AdminAccess])


class RoundsUnavailable(GatewayError):
    status = 503
    type = "service_unavailable"
    code = "rounds_unavailable"
    default_message = "This gateway has no round controller (started with --no-rounds)."


def _controller(services: ServicesDep) -> Any:
    if services.rounds is None:
        raise RoundsUnavailable()
    return services.rounds


@router.post("", status_code=status.HTTP_202_ACCEPTED)
async def start_round(spec: RoundSpec, services: ServicesDep) -> RunStatus:
    controller = _controller(services)
    try:
        run_id = await asyncio.to_thread(controller.start, spec)
    except RoundBusy as e:
        raise Conflict(f"A training run is already in progress: {e}") from e
    except ValueError as e:  # NoSilo: a named user has no data under the home
        raise BadRequest(str(e), param="users") from e
    run: RunStatus = await asyncio.to_thread(controller.get, run_id)
    return run


@router.get("")
async def list_rounds(services: ServicesDep) -> list[RunStatus]:
    runs: list[RunStatus] = await asyncio.to_thread(_controller(services).list)
    return runs


@router.get("/{run_id}")
async def get_round(run_id: str, services: ServicesDep) -> RunStatus:
    controller = _controller(services)
    try:
        run: RunStatus = await asyncio.to_thread(controller.get, run_id)
    except RunNotFound as e:
        raise NotFound("No such training run.") from e
    return run
