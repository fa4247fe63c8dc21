"""`/admin/rounds`: start a federated training round in the background and follow it.

The controller is `trainer.api.RoundController` (the trainer's only public interface), injected
into the app by `fedpersona serve` (tests inject a fake); without one these routes answer 503.
One round runs at a time: starting another while one runs is a 409.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Body, status
from pydantic import ValidationError

from service.auth import AdminAccess
from service.errors import BadRequest, Conflict, GatewayError, NotFound
from service.routes.deps import ServicesDep

router = APIRouter(prefix="/admin/rounds", tags=["rounds"], dependencies=[AdminAccess])


class RoundsUnavailable(GatewayError):
    status = 503
    type = "service_unavailable"
    code = "rounds_unavailable"
    default_message = "This gateway has no round controller (start it with `fedpersona serve`)."


def _controller(services: ServicesDep) -> Any:
    if services.rounds is None:
        raise RoundsUnavailable()
    return services.rounds


def _spec(fields: dict[str, Any]) -> Any:
    from trainer.api import RoundSpec

    try:
        return RoundSpec(**fields)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ())) or None
        raise BadRequest(f"{param}: {first.get('msg')}" if param else str(e), param=param) from e
    except (TypeError, ValueError) as e:
        raise BadRequest(f"invalid round spec: {e}") from e


def _status(run: Any) -> dict[str, Any]:
    dumped: dict[str, Any] = run.model_dump(mode="json")
    return dumped


@router.post("", status_code=status.HTTP_202_ACCEPTED)
async def start_round(
    services: ServicesDep, fields: Annotated[dict[str, Any] | None, Body()] = None
) -> dict[str, Any]:
    from trainer.api import RoundBusy

    controller = _controller(services)
    spec = _spec(fields or {})
    try:
        run_id = await asyncio.to_thread(controller.start, spec)
    except RoundBusy as e:
        raise Conflict(f"A training round is already running: {e}") from e
    return _status(await asyncio.to_thread(controller.get, run_id))


@router.get("")
async def list_rounds(services: ServicesDep) -> list[dict[str, Any]]:
    controller = _controller(services)
    return [_status(run) for run in await asyncio.to_thread(controller.list)]


@router.get("/{run_id}")
async def get_round(run_id: str, services: ServicesDep) -> dict[str, Any]:
    controller = _controller(services)
    try:
        run = await asyncio.to_thread(controller.get, run_id)
    except (KeyError, LookupError) as e:
        raise NotFound("No such round.") from e
    return _status(run)
