"""The gateway's only way to talk to vLLM: an async HTTP client for its OpenAI server.

`EngineClient` sends chat requests (whole or streamed), loads and unloads LoRA adapters by name,
and checks health. It turns transport failures into `EngineUnavailable` and error statuses into
`EngineRequestError(status, envelope)`; what a client then sees is decided by the gateway.

It does not know users, adapters on disk or which version is current (`AdapterManager` does),
and it never starts vLLM (`EngineSupervisor` does). It counts requests in flight so a shutdown
can drain them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import httpx
from fedpersona.service.engine import stream_http
from fedpersona.service.engine.stream_http import HttpxReader, LeanReader, Reader, StreamPool
from fedpersona.service.errors import EngineRequestError, EngineUnavailable

logger = logging.getLogger(__name__)

_JSON = {"Content-Type": "application/json"}
DONE_LINE = b"data: [DONE]"
POOLS = 8  # connection pools for streamed chat requests
KEEPALIVE = 256  # idle connections kept open to the engine, over all pools
# Below the 5 s after which vLLM's server (uvicorn) closes an idle connection: reusing one the
# server is closing at that instant fails the request with a ReadError.
KEEPALIVE_EXPIRY_S = 4.0

# A callable that raises EngineUnavailable while the engine must not be used (e.g. restarting).
Gate = Callable[[], None]


def _envelope(response: httpx.Response) -> dict[str, Any]:
    """vLLM's error body as an OpenAI envelope, whatever shape it came in."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body
    message = body.get("detail") if isinstance(body, dict) else None
    return {
        "error": {
            "message": str(message or response.text[:500] or response.reason_phrase),
            "type": "engine_error",
            "param": None,
            "code": response.status_code,
        }
    }


def renamed_chunk(line: bytes, *, engine_model: str, public_model: str) -> bytes | None:
    """Fast path for relaying vLLM's stream: a plain content chunk as an SSE event with its
    `model` renamed by one byte replace, or None when the line needs a JSON parse (the usage
    chunk, an error event, a chunk with a `system_fingerprint`, `[DONE]`, or a shape this does
    not recognise).

    Safe without parsing because vLLM writes compact JSON: inside a JSON string every quote is
    escaped, so an unescaped `"model":"<name>"` can only be the key itself; requiring exactly
    one occurrence rules out a nested `model` key.
    """
    return Renamer(engine_model, public_model)(line)


class Renamer:
    """`renamed_chunk` for one stream, its two needles encoded once rather than per line."""

    __slots__ = ("_needle", "_public")

    def __init__(self, engine_model: str, public_model: str) -> None:
        self._needle = b'"model":' + json.dumps(engine_model).encode()
        self._public = b'"model":' + json.dumps(public_model).encode()

    def __call__(self, line: bytes) -> bytes | None:
        if not line.startswith(b"data: {") or b'"usage"' in line or b'"error"' in line:
            return None
        if b'"system_fingerprint"' in line:
            return None  # the slow path drops it: it names the engine's version
        if line.count(self._needle) != 1:
            return None
        return line.replace(self._needle, self._public, 1) + b"\n\n"


def chunk_has_content(line: bytes) -> bool:
    """Whether a (fast-path) chunk line carries generated text, for time-to-first-token."""
    return b'"content":"' in line and b'"content":""' not in line


def stream_batches(engine: Any, body: dict[str, Any]) -> AsyncIterator[list[bytes]]:
    """`engine.stream_chat_batches(body)`, or for an engine without it (a test double), its
    `stream_chat` lines one per list."""
    batches = getattr(engine, "stream_chat_batches", None)
    if batches is not None:
        return batches(body)  # type: ignore[no-any-return]
    return _single_lines(engine.stream_chat(body))


async def flatten(batches: AsyncGenerator[list[bytes], None]) -> AsyncGenerator[bytes, None]:
    """The lines of a batched stream one by one (`stream_chat` over `stream_chat_batches`);
    closing it closes the batched stream."""
    try:
        async for batch in batches:
            for line in batch:
                yield line
    finally:
        await batches.aclose()


async def _single_lines(lines: AsyncIterator[bytes]) -> AsyncIterator[list[bytes]]:
    try:
        async for line in lines:
            yield [line]
    finally:
        aclose = getattr(lines, "aclose", None)
        if aclose is not None:
            await aclose()


class EngineClient:
    """Async client of one vLLM OpenAI-compatible server at `base_url`."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        request_timeout_s: float = 600.0,
        connect_timeout_s: float = 5.0,
        gate: Gate | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """`api_key` is the engine's shared secret, sent as a Bearer token on every request;
        `gate` is checked before every chat and every adapter load or unload."""
        self.base_url = base_url.rstrip("/")
        self._gate = gate
        # Streamed chat requests that go through httpx (see `_lean` below for the others)
        # spread over several connection pools: httpcore scans every connection
        # of a pool (a readability poll per idle one) each time a request starts or ends, so
        # one pool costs O(streams) per request; measured, that scan was a third of the
        # gateway's CPU at 64 streams (benchmarks/relay_capacity.py).
        self._pools = [
            httpx.AsyncClient(
                base_url=self.base_url,
                headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
                timeout=httpx.Timeout(request_timeout_s, connect=connect_timeout_s),
                # Concurrency is bounded by the gateway and by vLLM's scheduler, not by a pool
                # here: a pool limit would queue requests in front of an engine that batches.
                limits=httpx.Limits(
                    max_connections=None,
                    max_keepalive_connections=KEEPALIVE // POOLS,
                    keepalive_expiry=KEEPALIVE_EXPIRY_S,
                ),
                transport=transport,
            )
            for _ in range(1 if transport is not None else POOLS)
        ]
        self._pool_load = [0] * len(self._pools)
        # Streamed chat requests, the hot path, skip httpx where they can (see stream_http).
        self._lean: StreamPool | None = None
        if transport is None and stream_http.supported(self.base_url):
            self._lean = StreamPool(
                self.base_url,
                headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
                connect_timeout_s=connect_timeout_s,
                read_timeout_s=request_timeout_s,
                max_idle=KEEPALIVE,
                keepalive_expiry_s=KEEPALIVE_EXPIRY_S,
            )
        self._client = self._pools[0]  # adapter loads, probes
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # -- bookkeeping -----------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Chat requests currently being answered (streams count until they end)."""
        return self._in_flight

    def _check_gate(self) -> None:
        if self._gate is not None:
            self._gate()

    def _enter(self) -> None:
        self._check_gate()
        self._in_flight += 1
        self._idle.clear()

    def _exit(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no chat request is in flight; False if `timeout` seconds passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # -- chat ------------------------------------------------------------------------------

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """One non-streaming chat completion; returns vLLM's JSON answer."""
        self._enter()
        try:
            response = await self._post("/v1/chat/completions", body)
            try:
                result: dict[str, Any] = response.json()
            except ValueError as e:
                raise EngineUnavailable("The inference engine sent an unreadable answer.") from e
            return result
        finally:
            self._exit()

    def stream_chat(self, body: dict[str, Any]) -> AsyncGenerator[bytes, None]:
        """Stream a chat completion: yields each non-empty SSE line without its terminator.

        Lines look like `b'data: {...}'` and end with `b'data: [DONE]'`. An error status raises
        `EngineRequestError` before the first line, so the caller can still answer with an error
        status. Closing the iterator early closes the connection, which makes vLLM abort.
        """
        return flatten(self.stream_chat_batches(body))

    async def stream_chat_batches(self, body: dict[str, Any]) -> AsyncGenerator[list[bytes], None]:
        """`stream_chat`, with the lines that arrived in one read handed out as one list (never
        empty): the relay then writes them to its client in one send. Under load, when several
        tokens are waiting, that is less work per token; alone, each list holds one line."""
        self._enter()
        reader: Reader | None = None
        try:
            reader = await self._open_reader(body)
            pending = b""
            while True:
                try:
                    data = await reader.read()
                except httpx.TransportError as e:
                    raise self._unavailable(e) from e
                if not data:
                    break
                pending = pending + data if pending else data
                if b"\n" not in data:
                    continue
                *lines, pending = pending.split(b"\n")
                batch = [line for raw in lines if (line := raw.rstrip(b"\r"))]
                if not batch:
                    continue
                if DONE_LINE in batch:
                    # Read the (empty) rest before handing out the last line: callers stop at
                    # [DONE], and a fully read response returns its connection to the pool
                    # instead of closing it (a new TCP connection per request otherwise).
                    try:
                        await reader.finish()
                    except httpx.TransportError as e:
                        raise self._unavailable(e) from e
                yield batch
            if pending.strip():
                yield [pending.rstrip(b"\r")]
        finally:
            if reader is not None:
                await reader.aclose()
            self._exit()

    async def _open_reader(self, body: dict[str, Any]) -> Reader:
        """Send a streamed chat request and wait for its status; an error status raises
        `EngineRequestError`, a transport failure `EngineUnavailable`."""
        content = json.dumps(body).encode()
        if self._lean is not None:
            try:
                conn = await self._lean.open(content)
            except httpx.TransportError as e:
                raise self._unavailable(e) from e
            reader: Reader = LeanReader(self._lean, conn)
        else:
            reader = await self._httpx_reader(content)
        if reader.status != 200:
            try:
                error = await reader.error_response()
            except httpx.TransportError as e:
                await reader.aclose()
                raise self._unavailable(e) from e
            await reader.aclose()
            raise EngineRequestError(error.status_code, _envelope(error))
        return reader

    async def _httpx_reader(self, content: bytes) -> Reader:
        # The pool with the fewest open streams; a stream stops counting once its connection
        # is back in the pool (read to the end), even if the caller keeps the iterator open.
        pool = min(range(len(self._pools)), key=self._pool_load.__getitem__)
        self._pool_load[pool] += 1
        held = [True]

        def release() -> None:
            if held[0]:
                held[0] = False
                self._pool_load[pool] -= 1

        client = self._pools[pool]
        request = client.build_request(
            "POST", "/v1/chat/completions", content=content, headers=_JSON
        )
        try:
            response = await client.send(request, stream=True)
        except httpx.TransportError as e:
            release()
            raise self._unavailable(e) from e
        except BaseException:
            release()
            raise
        return HttpxReader(response, release)

    # -- adapters --------------------------------------------------------------------------

    async def load_lora(self, name: str, path: str, *, replace: bool = False) -> None:
        """Register a PEFT adapter dir under `name`; vLLM validates and preloads it.

        `replace` loads over a name vLLM may already hold (vLLM's `load_inplace`).
        """
        self._check_gate()
        body: dict[str, Any] = {"lora_name": name, "lora_path": path}
        if replace:
            body["load_inplace"] = True
        await self._post("/v1/load_lora_adapter", body)

    async def unload_lora(self, name: str) -> None:
        """Forget the adapter `name`; a 404 (already gone) is not an error."""
        self._check_gate()
        try:
            await self._post("/v1/unload_lora_adapter", {"lora_name": name})
        except EngineRequestError as e:
            if e.status != 404:
                raise

    async def models(self) -> list[str]:
        """Ids of everything vLLM serves now: the base model and each registered adapter."""
        try:
            response = await self._client.get("/v1/models")
        except httpx.TransportError as e:
            raise self._unavailable(e) from e
        if response.status_code != 200:
            raise EngineRequestError(response.status_code, _envelope(response))
        return [card["id"] for card in response.json().get("data", [])]

    async def health(self) -> bool:
        """True when vLLM answers /health with 200 (its engine loop is alive)."""
        try:
            response = await self._client.get("/health", timeout=5.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def aclose(self) -> None:
        if self._lean is not None:
            self._lean.close()
        for client in self._pools:
            await client.aclose()

    # -- internals -------------------------------------------------------------------------

    async def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        try:
            response = await self._client.post(path, content=json.dumps(body), headers=_JSON)
        except httpx.TransportError as e:
            raise self._unavailable(e) from e
        if response.status_code >= 400:
            raise EngineRequestError(response.status_code, _envelope(response))
        return response

    def _unavailable(self, error: httpx.TransportError) -> EngineUnavailable:
        logger.warning("engine at %s unreachable: %r", self.base_url, error)
        if isinstance(error, httpx.TimeoutException):
            return EngineUnavailable("The inference engine timed out; retry later.")
        return EngineUnavailable()
