"""A lean HTTP/1.1 client for the gateway's one hot path: streamed chat completions to vLLM.

Why not httpx here: vLLM writes one HTTP chunk per token, and h11 (under httpx and httpcore)
hands each chunk up through about ten Python layers as its own event, however many arrived in
one socket read. Measured with a sampling profiler on the relay benchmark
(`benchmarks/relay_capacity.py`), opening the request and reading the body through httpx were
37% of the gateway process's busy time. Here `httptools` (C, the parser uvicorn uses) decodes
the chunked body as it arrives, and a reader takes everything that arrived since its last read
in one piece: a gateway that falls behind does less work per token, not more.

Only what the streamed chat request needs: plain `http://`, one request at a time per
connection, keep-alive connections reused last-in first-out and dropped after
`keepalive_expiry_s` idle (before vLLM's uvicorn closes them at 5 s). Failures are raised as
httpx's own exception types (`ConnectError`, `ReadTimeout`, ...), so `EngineClient` maps them
to `EngineUnavailable` exactly as it maps httpx's. `EngineClient` falls back to httpx where this
does not apply (`https://`, a proxy set in the environment, a test transport, no httptools).
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections import deque
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx

try:
    import httptools
except ImportError:  # pragma: no cover - uvicorn without its standard extras
    httptools = None  # type: ignore[assignment]

# Stop reading from the socket above this much unread body: the relay's client is slow.
HIGH_WATER = 1 << 20


def supported(base_url: str) -> bool:
    """Whether `StreamPool` can talk to `base_url`: plain HTTP, httptools installed, and no
    proxy from the environment for it (httpx would use one; this client does not)."""
    parts = urlsplit(base_url)
    if httptools is None or parts.scheme != "http":
        return False
    proxies = urllib.request.getproxies_environment()
    if proxies.get("http") or proxies.get("all"):
        return bool(urllib.request.proxy_bypass(parts.netloc))
    return True


class StreamConnection(asyncio.Protocol):
    """One keep-alive connection to the engine; a response's body bytes are buffered as they
    arrive and taken by `read` all at once."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[None] | None = None
        self.lost = False
        self._reset()

    def _reset(self) -> None:
        self.answered = False  # any byte of this request's answer arrived
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.error: httpx.TransportError | None = None
        self._body: list[bytes] = []
        self._size = 0
        self._paused = False

    # -- asyncio protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.answered = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(httpx.RemoteProtocolError(f"unreadable answer from the engine: {e}"))
            return
        if self._size > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.complete and self.error is None:
            self.error = httpx.ReadError(str(exc or "the engine closed the connection"))
        self._wake()

    # -- parser callbacks ------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self.keep_alive = self._parser.should_keep_alive()
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._size += len(body)

    def on_message_complete(self) -> None:
        self.complete = True

    # -- used by the pool and the reader ---------------------------------------------------

    @property
    def idle_ok(self) -> bool:
        """Usable for a new request: the last answer was read whole and the line is open."""
        return (
            self.complete
            and self.keep_alive
            and self.error is None
            and not self.lost
            and self.transport is not None
            and not self.transport.is_closing()
        )

    def start(self, request: bytes) -> None:
        self._reset()
        assert self.transport is not None
        self.transport.write(request)

    async def read_head(self, timeout: float) -> None:
        """Wait for the status line and headers."""
        while not self.headers_done:
            if self.error is not None:
                raise self.error
            await self._wait(timeout)

    async def read(self, timeout: float) -> bytes:
        """All body bytes that arrived since the last read; b"" once the body is complete."""
        while not self._body:
            if self.complete:
                return b""
            if self.error is not None:
                raise self.error
            await self._wait(timeout)
        body = self._body
        data = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        self._size = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    def close(self) -> None:
        """Drop the connection; an unfinished answer is aborted (vLLM stops generating)."""
        if self.transport is not None:
            self.transport.close()

    def _fail(self, error: httpx.TransportError) -> None:
        if self.error is None:
            self.error = error
        self.close()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self, timeout: float) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                await self._waiter
        except TimeoutError as e:
            raise httpx.ReadTimeout("the inference engine did not answer in time") from e
        finally:
            self._waiter = None


class StreamPool:
    """Keep-alive connections to one engine for `POST /v1/chat/completions`."""

    def __init__(
        self,
        base_url: str,
        *,
        headers: dict[str, str],
        connect_timeout_s: float,
        read_timeout_s: float,
        max_idle: int,
        keepalive_expiry_s: float,
    ) -> None:
        parts = urlsplit(base_url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.read_timeout_s = read_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_idle = max_idle
        self.keepalive_expiry_s = keepalive_expiry_s
        lines = [
            f"POST {parts.path.rstrip('/')}/v1/chat/completions HTTP/1.1",
            f"Host: {parts.netloc}",
            "Accept: */*",
            "Content-Type: application/json",
            *(f"{name}: {value}" for name, value in headers.items()),
        ]
        self._head = ("\r\n".join(lines) + "\r\nContent-Length: ").encode("latin-1")
        self._idle: deque[tuple[StreamConnection, float]] = deque()
        self._closed = False

    async def open(self, body: bytes) -> StreamConnection:
        """Send a chat request; return its connection once the status and headers are in.

        A kept-alive connection can be closed by the engine just as it is reused (vLLM's idle
        timer and this pool's expiry crossing, e.g. when this process was starved of CPU and
        handed the connection back late). Then the engine closes it without a byte of answer:
        its server never took the request, so it is sent once more on a new connection. Any
        other failure, or one on a new connection, is raised.
        """
        request = self._head + b"%d\r\n\r\n" % len(body) + body
        conn = self._take_idle()
        if conn is not None:
            try:
                return await self._send(conn, request)
            except (httpx.ReadError, httpx.WriteError):
                if conn.answered:
                    raise
        return await self._send(await self._connect(), request)

    async def _send(self, conn: StreamConnection, request: bytes) -> StreamConnection:
        conn.start(request)
        try:
            await conn.read_head(self.read_timeout_s)
        except BaseException:
            conn.close()
            raise
        return conn

    def release(self, conn: StreamConnection) -> None:
        """Hand a connection back: kept if its answer was read whole, else closed."""
        now = time.monotonic()
        idle = self._idle
        while idle and (idle[0][1] <= now or not idle[0][0].idle_ok):
            idle.popleft()[0].close()
        if conn.idle_ok and not self._closed and len(idle) < self.max_idle:
            idle.append((conn, now + self.keepalive_expiry_s))
        else:
            conn.close()

    def close(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop()[0].close()

    def _take_idle(self) -> StreamConnection | None:
        now = time.monotonic()
        while self._idle:
            conn, expires = self._idle.pop()
            if expires > now and conn.idle_ok:
                return conn
            conn.close()
        return None

    async def _connect(self) -> StreamConnection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(StreamConnection, self.host, self.port)
        except TimeoutError as e:
            raise httpx.ConnectTimeout("connecting to the inference engine timed out") from e
        except OSError as e:
            raise httpx.ConnectError(str(e)) from e
        return conn


class Reader:
    """One streamed answer's body, from httpx or from the lean pool (`stream_http`)."""

    status: int

    async def read(self) -> bytes:
        """The body bytes that arrived since the last read; b"" at its end."""
        raise NotImplementedError

    async def finish(self) -> None:
        """Read the rest and give the connection back for reuse."""
        raise NotImplementedError

    async def error_response(self) -> httpx.Response:
        """The whole (error) answer, for `_envelope`."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Give the connection back: reused if the answer was read whole, closed otherwise."""
        raise NotImplementedError


class HttpxReader(Reader):
    def __init__(self, response: httpx.Response, release: Callable[[], None]) -> None:
        self.status = response.status_code
        self._response = response
        self._chunks = response.aiter_bytes()
        self._release = release

    async def read(self) -> bytes:
        return await anext(self._chunks, b"")

    async def finish(self) -> None:
        async for _ in self._chunks:
            pass
        self._release()

    async def error_response(self) -> httpx.Response:
        await self._response.aread()
        return self._response

    async def aclose(self) -> None:
        try:
            await self._response.aclose()
        finally:
            self._release()


class LeanReader(Reader):
    def __init__(self, pool: StreamPool, conn: StreamConnection) -> None:
        self.status = conn.status
        self._pool = pool
        self._conn: StreamConnection | None = conn

    async def read(self) -> bytes:
        if self._conn is None:
            return b""
        return await self._conn.read(self._pool.read_timeout_s)

    async def finish(self) -> None:
        conn = self._conn
        if conn is not None:
            while await conn.read(self._pool.read_timeout_s):
                pass
            self._conn = None
            self._pool.release(conn)

    async def error_response(self) -> httpx.Response:
        assert self._conn is not None
        parts = []
        while part := await self._conn.read(self._pool.read_timeout_s):
            parts.append(part)
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in self._conn.headers]
        return httpx.Response(self.status, headers=headers, content=b"".join(parts))

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool.release(conn)
