"""ASGI middleware of the gateway: who may send a body, how large, and how slowly.

Order in `fedpersona.service.http.app.create_app` (outermost first): metrics, `AuthenticateFirst`,
`BodyLimits`, then the routes. So a caller without a valid key is answered 401 before a byte of
their body is read or parsed, and a body that is too large or too slow is refused (413, 408)
before any handler runs.

Knows the API's path layout (`/v1`, `/admin`, `/metrics`) and the credentials each needs, not
what the routes do; the routes' own dependencies check again (defence in depth) and reuse the
user found here (`scope["state"]["user"]`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Callable

from fedpersona.service.errors import (
    AuthenticationFailed,
    GatewayError,
    PayloadTooLarge,
    RequestTimeout,
)
from fedpersona.service.registry import User
from starlette.types import ASGIApp, Message, Receive, Scope, Send

USER_STATE = "user"  # the key of the authenticated user in the request's state
MISSING_KEY = (
    "Missing API key. Send it as 'Authorization: Bearer <key>'; an administrator creates keys "
    "with `fedpersona users add NAME`."
)


def bearer(scope: Scope) -> str | None:
    """The Bearer token of a request, or None."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            token = token.strip()
            return token if scheme.lower() == "bearer" and token else None
    return None


async def send_error(send: Send, error: GatewayError, *, close: bool = False) -> None:
    """Send `error`'s envelope. `close` adds `Connection: close`, for refusals that leave the
    request body unread (413, 408): the server then drops the connection at once instead of
    waiting on the rest of a body nobody will read until its keep-alive timer fires."""
    body = json.dumps(error.envelope()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers().items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class AuthenticateFirst:
    """Check credentials from the headers alone, before the body is read.

    `/v1/...` needs a user key (`authenticate_user`: a database read, in a thread unless
    `authenticate_inline`, for a database whose reads are quicker than a thread hand-off),
    `/admin` the admin key (`check_admin`, which raises the right `GatewayError`), and
    `/metrics` the metrics key when one is set. Other paths (probes, docs) pass.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        authenticate_user: Callable[[str], User | None],
        check_admin: Callable[[str | None], None],
        metrics_key: str = "",
        authenticate_inline: bool = False,
    ) -> None:
        self.app = app
        self._authenticate_user = authenticate_user
        self._authenticate_inline = authenticate_inline
        self._check_admin = check_admin
        self._metrics_key = metrics_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") == "OPTIONS":
            await self.app(scope, receive, send)
            return
        try:
            await self._check(scope)
        except GatewayError as e:
            await send_error(send, e)
            return
        await self.app(scope, receive, send)

    async def _check(self, scope: Scope) -> None:
        path: str = scope.get("path", "")
        token = bearer(scope)
        if path == "/v1" or path.startswith("/v1/"):
            if token is None:
                raise AuthenticationFailed(MISSING_KEY)
            if self._authenticate_inline:
                user = self._authenticate_user(token)
            else:
                user = await asyncio.to_thread(self._authenticate_user, token)
            if user is None:
                raise AuthenticationFailed()
            scope.setdefault("state", {})[USER_STATE] = user
        elif path == "/admin" or path.startswith("/admin/"):
            await asyncio.to_thread(self._check_admin, token)
        elif path == "/metrics" and self._metrics_key and not self._is_metrics_key(token):
            raise AuthenticationFailed("/metrics needs the metrics key.")

    def _is_metrics_key(self, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(token.encode(), self._metrics_key.encode())


class BodyLimits:
    """Refuse request bodies above `max_bytes` (413, declared or streamed) and bodies that do
    not arrive in full within `timeout_s` (408: a client sending 10 of 100 bytes and waiting
    holds a connection otherwise).

    The body is read ahead (bounded by the limit) and replayed to the app, so a refused body is
    refused before any handler runs rather than failing mid-parse.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await send_error(send, PayloadTooLarge(), close=True)
                return
        buffered: list[Message] = []
        seen = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        while True:
            try:
                # Not `wait_for`: it runs `receive()` in a task of its own, one more pass of
                # the event loop per request, and the body is almost always there already.
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                await send_error(send, RequestTimeout(), close=True)
                return
            buffered.append(message)
            if message["type"] != "http.request":
                break  # a disconnect: let the app see it
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                await send_error(send, PayloadTooLarge(), close=True)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)
