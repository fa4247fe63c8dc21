"""How the gateway runs under uvicorn: connection limits, header deadline, a redacted access log.

`uvicorn_config(app, settings)` is what `fedpersona serve` runs (and what the security tests
start). It caps connections and requests at once (`limit_concurrency`: 503 above), closes
connections that do not finish sending a request's headers within `header_timeout_s` (uvicorn
has no such timeout: a client sending half a header line held a connection forever), and turns
uvicorn's access log off: the gateway writes its own when a response ends
(`fedpersona.service.http.app.MetricsMiddleware`), with the duration and without the query
string (`?api_key=...` would put a key in the log). uvicorn's is written when the response
starts, on the way to a stream's first token. `RedactQuery` still guards uvicorn's log for a
caller who turns it back on.

Knows uvicorn, not the routes. Body deadlines and sizes are ASGI middleware
(`fedpersona.service.http.middleware`), so they hold under any server.
"""

from __future__ import annotations

import logging
from typing import Any

import uvicorn
from fedpersona.service.settings import Settings

logger = logging.getLogger(__name__)

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - uvicorn without httptools
    HttpToolsProtocol = None  # type: ignore[assignment,misc]


class RedactQuery(logging.Filter):
    """Replace the query string of uvicorn's access-log lines with `?<redacted>`."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            path, sep, _ = args[2].partition("?")
            if sep:
                record.args = (*args[:2], f"{path}?<redacted>", *args[3:])
        return True


def install_access_log_redaction() -> None:
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactQuery) for f in access.filters):
        access.addFilter(RedactQuery())


def header_deadline_protocol(timeout_s: float) -> type[Any] | None:
    """uvicorn's httptools protocol, closing a connection whose request headers are not
    complete `timeout_s` after it opened or after the previous response (None without
    httptools)."""
    if HttpToolsProtocol is None:
        return None

    class HeaderDeadlineProtocol(HttpToolsProtocol):  # type: ignore[misc,valid-type]
        _header_timer: Any = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # A pipelined request's headers may already be in; else the next ones are due.
            if not self.pipeline and not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(timeout_s, self._expired)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                logger.info("closing a connection that sent no complete request headers")
                self.transport.close()

    return HeaderDeadlineProtocol


def uvicorn_config(app: Any, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """The uvicorn configuration of a gateway process; `overrides` for tests (e.g. `port`)."""
    install_access_log_redaction()
    protocol = header_deadline_protocol(settings.header_timeout_s)
    if protocol is None:
        logger.warning("httptools missing: no deadline for request headers")
    values: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_config": None,  # keep the root logging set up by `fedpersona`
        "timeout_graceful_shutdown": int(settings.shutdown_grace_s) or None,
        "proxy_headers": False,  # identity comes from API keys only, never from headers
        "limit_concurrency": settings.max_connections,
        "http": protocol or "auto",
        "server_header": False,  # the server's name and version are nobody's business
        "access_log": False,  # the app writes its own (see the module doc)
    }
    values.update(overrides)
    return uvicorn.Config(app, **values)
