"""`POST /v1/chat/completions`: OpenAI chat, whole or streamed (server-sent events).

The engine request runs only while the client is there: a client that disconnects before the
answer (or, for a stream, before its first event) cancels it, which closes the connection to
vLLM and makes vLLM abort the generation. Once a stream runs, the response watches for the
disconnect (`_HeldStream`) and the relay closes the engine stream. Each user has at most
`max_in_flight_per_user` requests running (429 above), a stream counting until its response
ends, however it ends. Every answer names what served it in the `x-fedpersona-adapter` header
(`<slot>@<version id>` or `base`; for a stream, on the response's headers).

The route is a plain ASGI app (`ChatCompletions`, mounted as a Starlette `Route`), not a FastAPI
path operation: FastAPI's dependency solving, exit stack and per-message send wrappers cost
~0.3 ms of every request's time to first token, the path the gateway exists for. It does what
FastAPI did, in the same order (caller, rate limit, body) and with the same 400 messages;
`documented` describes it in the OpenAPI schema.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fedpersona.service.errors import BadRequest, ClientDisconnected
from fedpersona.service.http.auth import LimitedUser, charge_request, user_of
from fedpersona.service.http.chat import ADAPTER_HEADER
from fedpersona.service.http.limits import InFlightLimiter
from fedpersona.service.http.protocol import ChatCompletionRequest
from fedpersona.service.registry import User
from fedpersona.service.state import Services
from pydantic import ValidationError
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

PATH = "/v1/chat/completions"
T = TypeVar("T")


async def _disconnected(receive: Receive) -> None:
    """Return when the client has gone (the body was read already, so only that can come)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class DisconnectWatch:
    """`async with DisconnectWatch(receive):` cancels the task running the block when the client
    disconnects, and raises `ClientDisconnected` out of the block instead.

    The block runs in the caller's own task, as `asyncio.timeout` runs its block: only the
    watcher is a new task. Running the work in a task of its own and racing the two
    (`asyncio.wait`) cost one more pass of the event loop on every request's way to its first
    token, twice per stream (before the answer, and while it streams).
    """

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._task: asyncio.Task[Any] | None = None
        self._watcher: asyncio.Future[None] | None = None
        self._gone = False

    async def __aenter__(self) -> DisconnectWatch:
        self._task = asyncio.current_task()
        self._watcher = asyncio.ensure_future(_disconnected(self._receive))
        self._watcher.add_done_callback(self._on_watcher_done)
        return self

    def _on_watcher_done(self, watcher: asyncio.Future[None]) -> None:
        # Also runs (scheduled) after the block ended: `_task` is None then.
        if self._task is not None and not watcher.cancelled() and watcher.exception() is None:
            self._gone = True
            self._task.cancel()

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        task, self._task = self._task, None
        if self._watcher is not None:
            self._watcher.cancel()
        if self._gone and task is not None:
            others = task.uncancel()  # > 0: somebody else cancelled the task too
            if exc_type is asyncio.CancelledError and others == 0:
                raise ClientDisconnected()


async def while_connected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and raising `ClientDisconnected`) if the client leaves."""
    async with DisconnectWatch(request.receive):
        return await work


class _HeldStream(StreamingResponse):
    """A stream that gives its in-flight slot back when the response ends, however it ends
    (finished, failed, or the client gone before the first byte)."""

    def __init__(self, content: Any, *, release: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            spec = scope.get("asgi", {}).get("spec_version", "2.0")
            if tuple(map(int, spec.split("."))) >= (2, 4):
                await super().__call__(scope, receive, send)  # a send fails once it is gone
            else:
                await self._stream_while_connected(receive, send)
        finally:
            self._release()

    async def _stream_while_connected(self, receive: Receive, send: Send) -> None:
        """Starlette's stream-or-disconnect race, with the stream in this task: an anyio task
        group (Starlette's way) costs ~0.1 ms more per stream, on the time to first token. The
        client leaving cancels the relay, which closes the engine stream (vLLM aborts the
        generation)."""
        try:
            async with DisconnectWatch(receive):
                await self.stream_response(send)
        except ClientDisconnected:
            pass
        finally:
            # A relay cancelled between two events is parked at a `yield`: close it now, so
            # the adapter pin and the engine connection go at once, not when it is collected.
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()


class ChatCompletions:
    """`POST /v1/chat/completions`, as a plain ASGI app. Errors are raised, before the response
    starts, to the app's exception handlers (the OpenAI envelope)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        services: Services = scope["app"].state.services
        user = await user_of(request, services)
        await charge_request(user, services)
        body = await read_chat_request(request)
        response = await respond(request, body, user=user, services=services)
        await response(scope, receive, send)


def route() -> Route:
    return Route(PATH, ChatCompletions(), methods=["POST"], name="create_chat_completion")


async def read_chat_request(request: Request) -> ChatCompletionRequest:
    """The body as a `ChatCompletionRequest`, read as FastAPI reads a JSON body parameter (JSON
    when the content type is absent or JSON, else the raw bytes, which fail validation); errors
    are `RequestValidationError`s located under "body", which the app answers with a 400."""
    raw = await request.body()
    data: Any = None
    if raw:
        content_type = request.headers.get("content-type")
        if content_type is None or _is_json(content_type):
            try:
                data = json.loads(raw)
            except json.JSONDecodeError as e:
                error = {"type": "json_invalid", "loc": ("body", e.pos), "msg": "JSON decode error"}
                raise RequestValidationError([error]) from e
            except ValueError as e:  # bytes that are no Unicode text at all
                raise BadRequest("The request body is not valid JSON text (UTF-8).") from e
            except RecursionError as e:
                raise BadRequest("The request body is nested too deeply.") from e
        else:
            data = raw
    if data is None:
        raise RequestValidationError(
            [{"type": "missing", "loc": ("body",), "msg": "Field required"}]
        )
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        errors = [{**error, "loc": ("body", *error["loc"])} for error in e.errors()]
        raise RequestValidationError(errors) from e


def _is_json(content_type: str) -> bool:
    media = content_type.partition(";")[0].strip().lower()
    maintype, _, subtype = media.partition("/")
    return maintype == "application" and (subtype == "json" or subtype.endswith("+json"))


async def respond(
    request: Request, body: ChatCompletionRequest, *, user: User, services: Services
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


# The OpenAPI description of the route above: this router is given to the schema generator only
# (`create_app`), never mounted, so its function is never called.
documented = APIRouter(tags=["chat"])


@documented.post(PATH, response_model=None)
async def create_chat_completion(body: ChatCompletionRequest, _: LimitedUser) -> Response:
    """Create a chat completion with the caller's personalized model (`model: "personal"`) or
    the base model; `stream: true` answers with server-sent events."""
    raise NotImplementedError("documentation only: ChatCompletions serves this path")
