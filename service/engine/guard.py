"""The vLLM server's front door: every path needs the engine key except `/health` and `/metrics`.

Loaded into the vLLM process with `--middleware fedpersona.service.engine.guard.EngineKeyGuard`
(`fedpersona.service.engine.config.engine_argv` adds it). vLLM's own `--api-key` check guards
only the `/v1`, `/v2`, `/inference` and `/cohere` prefixes; `/invocations` (chat with any model
name, adapters included), `/tokenize`, `/pause`, `/abort_requests` and the profiling and scaling
endpoints stay open. This guard is default-deny instead: a probe or a metrics scraper reaches
`GET /health` and `GET /metrics` without the key, nothing else does.

The key is vLLM's own `VLLM_API_KEY` environment variable (never argv: a command line is
readable by every process on the host and ends up in logs), so vLLM's check and this one agree.
Without a key the guard refuses to start rather than serve an open engine.

Pure ASGI and standard library only: it runs inside vLLM, not the gateway.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

ENGINE_API_KEY_ENV = "VLLM_API_KEY"
GUARD_MIDDLEWARE = "fedpersona.service.engine.guard.EngineKeyGuard"
# Paths a kubelet probe or a Prometheus scraper needs; read-only and free of user data except
# that vLLM's metrics label running adapters by engine name (see docs/security.md).
OPEN_PATHS = frozenset({"/health", "/metrics", "/metrics/"})

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def is_open(method: str, path: str) -> bool:
    """Whether a request may pass without the key: GET/HEAD of a probe or metrics path."""
    return method in ("GET", "HEAD") and path in OPEN_PATHS


def bearer_matches(headers: list[tuple[bytes, bytes]], key_digest: bytes) -> bool:
    """Constant-time check of an `Authorization: Bearer <key>` header against the key's digest."""
    for name, value in headers:
        if name.lower() != b"authorization":
            continue
        scheme, _, token = value.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(hashlib.sha256(token.strip()).digest(), key_digest)
    return False


class EngineKeyGuard:
    """ASGI middleware for vLLM's app: 401 for every request without the engine key, except
    `is_open` ones. WebSocket requests are guarded the same way."""

    def __init__(self, app: ASGIApp, key: str | None = None) -> None:
        key = key if key is not None else os.environ.get(ENGINE_API_KEY_ENV, "")
        if not key:
            raise RuntimeError(
                f"{ENGINE_API_KEY_ENV} is not set: refusing to serve vLLM without an API key"
            )
        self.app = app
        self._digest = hashlib.sha256(key.encode()).digest()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if kind == "http" and is_open(scope.get("method", ""), scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        if bearer_matches(list(scope.get("headers", ())), self._digest):
            await self.app(scope, receive, send)
            return
        if kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps(
            {
                "error": {
                    "message": "Unauthorized: this engine answers only its gateway.",
                    "type": "authentication_error",
                    "param": None,
                    "code": 401,
                }
            }
        ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b"Bearer"),
        ]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})
