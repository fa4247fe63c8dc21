"""`/admin/rounds`: start a federated training run in the background and follow it.

One router for every app that serves rounds: the gateway and the trainer pod's API
(`fedpersona.trainer_api`) include this same router, so both answer with the same statuses, the
same OpenAI error envelope and the same admin-key rules (`AdminAccess`). The controller is any
`fedpersona.trainer.rounds.interface.RoundController` (in-process, remote, or a test fake) kept
on `app.state.rounds`; without one these routes answer 503. One run at a time: starting another
while one runs is a 409; a spec the trainer cannot run is a 400 on the field it names.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, status
from fedpersona.service.errors import BadRequest, Conflict, GatewayError, NotFound
from fedpersona.service.http.auth import AdminAccess
from fedpersona.trainer.rounds.interface import (
    InvalidRoundSpec,
    RoundBusy,
    RoundController,
    RoundSpec,
    RoundsUnreachable,
    RunNotFound,
    RunStatus,
)

router = APIRouter(prefix="/admin/rounds", tags=["rounds"], dependencies=[AdminAccess])


class RoundsUnavailable(GatewayError):
    status = 503
    type = "service_unavailable"
    code = "rounds_unavailable"
    default_message = "This gateway has no round controller (started with --no-rounds)."


def _controller(request: Request) -> RoundController:
    controller: RoundController | None = getattr(request.app.state, "rounds", None)
    if controller is None:
        raise RoundsUnavailable()
    return controller


@router.post("", status_code=status.HTTP_202_ACCEPTED)
async def start_round(spec: RoundSpec, request: Request) -> RunStatus:
    controller = _controller(request)
    try:
        run_id = await asyncio.to_thread(controller.start, spec)
        return await asyncio.to_thread(controller.get, run_id)
    except RoundBusy as e:
        raise Conflict(str(e)) from e  # says which run, or that another process trains
    except InvalidRoundSpec as e:
        raise BadRequest(str(e), param=e.param) from e
    except RoundsUnreachable as e:
        raise RoundsUnavailable(f"The trainer is not available: {e}", retry_after=5) from e


@router.get("")
async def list_rounds(request: Request) -> list[RunStatus]:
    try:
        return await asyncio.to_thread(_controller(request).list)
    except RoundsUnreachable as e:
        raise RoundsUnavailable(f"The trainer is not available: {e}", retry_after=5) from e


@router.get("/{run_id}")
async def get_round(run_id: str, request: Request) -> RunStatus:
    controller = _controller(request)
    try:
        return await asyncio.to_thread(controller.get, run_id)
    except RunNotFound as e:
        raise NotFound("No such training run.") from e
    except RoundsUnreachable as e:
        raise RoundsUnavailable(f"The trainer is not available: {e}", retry_after=5) from e
