"""`POST /v1/chat/completions`: OpenAI chat, whole or streamed (server-sent events).

The engine request runs only while the client is there: a client that disconnects before the
answer (or, for a stream, before its first event) cancels it, which closes the connection to
vLLM and makes vLLM abort the generation. Once a stream runs, Starlette's `StreamingResponse`
notices the disconnect and the relay closes the engine stream. Each user has at most
`max_in_flight_per_user` requests running (429 above), a stream counting until its response
ends, however it ends. Every answer names what served it in the `x-fedpersona-adapter` header
(`<slot>@<version id>` or `base`; for a stream, on the response's headers).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fedpersona.service.errors import ClientDisconnected
from fedpersona.service.http.auth import LimitedUser
from fedpersona.service.http.chat import ADAPTER_HEADER
from fedpersona.service.http.limits import InFlightLimiter
from fedpersona.service.http.protocol import ChatCompletionRequest
from fedpersona.service.http.routes.deps import ServicesDep
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

router = APIRouter(tags=["chat"])
T = TypeVar("T")


async def _disconnected(receive: Receive) -> None:
    """Return when the client has gone (the body was read already, so only that can come)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def while_connected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and raising `ClientDisconnected`) if the client leaves."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise ClientDisconnected()
    return task.result()


class _HeldStream(StreamingResponse):
    """A stream that gives its in-flight slot back when the response ends, however it ends
    (finished, failed, or the client gone before the first byte)."""

    def __init__(self, content: Any, *, release: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(
    body: ChatCompletionRequest, user: LimitedUser, services: ServicesDep, request: Request
) -> Response:
    limiter: InFlightLimiter = request.app.state.in_flight
    release = limiter.hold(user.name)
    handed_over = False
    try:
        outcome = await while_connected(request, services.chat.serve(body, user=user))
        result, served = outcome.result, {ADAPTER_HEADER: outcome.served.adapter}
        if isinstance(result, dict):
            return JSONResponse(result, headers=served)
        handed_over = True
        return _HeldStream(
            result,
            release=release,
            media_type="text/event-stream",
            # Proxies must pass events through as they come.
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **served},
        )
    finally:
        if not handed_over:
            release()
