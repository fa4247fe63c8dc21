"""The lean streamed-chat path (`stream_http`) against raw HTTP servers, and the relay's batches.

`EngineClient` takes this path for a plain `http://` engine without a test transport; what it
must keep from the httpx path: lines whatever the chunking, error statuses as
`EngineRequestError` with vLLM's envelope, transport failures as `EngineUnavailable`, the
engine key on the request, connection reuse after `[DONE]`, and an aborted connection when
the caller stops early (vLLM aborts the generation).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from fake_engine import BASE_MODEL
from fedpersona.adapters import AdapterStore, Slot
from fedpersona.service.engine.client import EngineClient
from fedpersona.service.errors import EngineRequestError, EngineUnavailable
from gateway_harness import Gateway
from support.lora import random_lora
from test_gateway_chat import sse_events

Handler = Callable[[bytes, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> bytes | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = head.split(b"\r\n")
    length = next(int(h.split(b":")[1]) for h in lines if h.lower().startswith(b"content-length"))
    return head + await reader.readexactly(length)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


OK_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)


async def _serve(
    handler: Handler, main: Callable[[str], Awaitable[Any]], closed: list[bool] | None = None
) -> Any:
    """Run `main(base_url)` against a server that answers each request with `handler`;
    `closed` gets an entry for each connection the client closed."""
    closed = [] if closed is None else closed

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (request := await _read_request(reader)) is not None:
            await handler(request, writer)
        closed.append(True)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        return await main(f"http://127.0.0.1:{port}")
    finally:
        server.close()


def test_lines_arriving_together_come_as_one_batch_and_split_lines_are_joined() -> None:
    async def handler(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(OK_HEAD)
        # Three events in one write; then one event split over two writes mid-line.
        writer.write(b"".join(_chunk(b'data: {"n":%d}\n\n' % i) for i in range(3)))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(_chunk(b'data: {"n":'))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(_chunk(b"3}\r\n\r\n") + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        await writer.drain()

    async def main(url: str) -> list[list[bytes]]:
        c = EngineClient(url)
        assert c._lean is not None  # the lean path, not httpx
        try:
            return [batch async for batch in c.stream_chat_batches({})]
        finally:
            await c.aclose()

    batches = asyncio.run(_serve(handler, main))
    assert batches[0] == [b'data: {"n":0}', b'data: {"n":1}', b'data: {"n":2}']
    assert [line for batch in batches[1:] for line in batch] == [b'data: {"n":3}', b"data: [DONE]"]


def test_error_status_raises_with_the_envelope_and_the_key_is_sent() -> None:
    seen: list[bytes] = []

    async def handler(request: bytes, writer: asyncio.StreamWriter) -> None:
        seen.append(request)
        error = {"message": "too long", "type": "BadRequestError", "param": None, "code": 400}
        body = json.dumps({"error": error}).encode()
        writer.write(
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()

    async def main(url: str) -> EngineRequestError:
        c = EngineClient(url, api_key="engine-secret")
        try:
            with pytest.raises(EngineRequestError) as e:
                async for _ in c.stream_chat({"model": "m"}):
                    pass
            assert c.in_flight == 0
            return e.value
        finally:
            await c.aclose()

    error = asyncio.run(_serve(handler, main))
    assert error.status == 400 and error.message == "too long"
    head, _, body = seen[0].partition(b"\r\n\r\n")
    assert b"authorization: bearer engine-secret" in head.lower()
    assert head.startswith(b"POST /v1/chat/completions HTTP/1.1")
    assert json.loads(body) == {"model": "m"}


def test_connection_lost_midway_is_unavailable() -> None:
    async def handler(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(OK_HEAD + _chunk(b'data: {"n":0}\n\n'))
        await writer.drain()
        writer.close()

    async def main(url: str) -> list[bytes]:
        c = EngineClient(url)
        lines: list[bytes] = []
        try:
            with pytest.raises(EngineUnavailable):
                async for line in c.stream_chat({}):
                    lines.append(line)
            assert c.in_flight == 0
            return lines
        finally:
            await c.aclose()

    assert asyncio.run(_serve(handler, main)) == [b'data: {"n":0}']


def test_a_silent_engine_times_out() -> None:
    async def handler(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(OK_HEAD)
        await writer.drain()
        await asyncio.sleep(1)

    async def main(url: str) -> None:
        c = EngineClient(url, request_timeout_s=0.2)
        try:
            with pytest.raises(EngineUnavailable, match="timed out"):
                async for _ in c.stream_chat({}):
                    pass
        finally:
            await c.aclose()

    asyncio.run(_serve(handler, main))


def test_stopping_early_closes_the_connection() -> None:
    """A caller that stops before [DONE] (its client left) must drop the connection: that is
    what makes vLLM abort the generation. The next request opens a new one."""
    connections: list[asyncio.StreamWriter] = []
    closed: list[bool] = []

    async def handler(request: bytes, writer: asyncio.StreamWriter) -> None:
        if writer not in connections:
            connections.append(writer)
        writer.write(OK_HEAD + _chunk(b'data: {"n":0}\n\n'))
        await writer.drain()
        await asyncio.sleep(0.2)  # more would follow; the client is gone by then

    async def main(url: str) -> None:
        c = EngineClient(url)
        try:
            for _ in range(2):
                stream = c.stream_chat({})
                assert await anext(stream) == b'data: {"n":0}'
                await stream.aclose()  # type: ignore[attr-defined]
                assert c.in_flight == 0
            await asyncio.sleep(0.4)  # the handlers' sleeps end, then the server sees EOF
            assert len(closed) == 2  # both connections closed by the client, not reused
        finally:
            await c.aclose()

    asyncio.run(_serve(handler, main, closed))
    assert len(connections) == 2


def test_the_relay_writes_each_batch_once_and_says_the_same(gw: Gateway) -> None:
    """An engine whose lines arrive several at a time: the client gets the same events as
    line by line (renamed, usage stripped, [DONE] last)."""
    expected = sse_events(gw.chat("alice", stream=True).text)
    single = gw.engine.stream_chat

    async def grouped(body: dict[str, Any]) -> AsyncIterator[list[bytes]]:
        lines = [line async for line in single(body)]
        for i in range(0, len(lines), 3):
            yield lines[i : i + 3]

    gw.engine.stream_chat_batches = grouped  # type: ignore[attr-defined]
    response = gw.chat("alice", stream=True)
    assert response.status_code == 200
    assert sse_events(response.text) == expected
    assert expected[-1] == "[DONE]"
    assert all(json.loads(e)["model"] == "personal" for e in expected[:-1])


def test_the_first_token_goes_out_before_the_rest_of_its_batch(gw: Gateway) -> None:
    """An engine that sends the whole answer in one read (a loaded engine, or a fast one): the
    client's first token is written alone, not after the rest of the read is renamed."""
    single = gw.engine.stream_chat

    async def all_at_once(body: dict[str, Any]) -> AsyncIterator[list[bytes]]:
        yield [line async for line in single(body)]

    gw.engine.stream_chat_batches = all_at_once  # type: ignore[attr-defined]
    request = {
        "model": "personal",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
    }
    raw = json.dumps(request).encode()
    headers = [(b"content-type", b"application/json")]
    headers += [(k.lower().encode(), v.encode()) for k, v in gw.auth("alice").items()]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    writes: list[bytes] = []

    async def call() -> None:
        sent = asyncio.Event()

        async def receive() -> dict[str, Any]:
            if not sent.is_set():
                sent.set()
                return {"type": "http.request", "body": raw, "more_body": False}
            await asyncio.Event().wait()  # the client stays until the answer ends
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                writes.append(message["body"])

        await gw.client.app(scope, receive, send)

    asyncio.run(call())
    contents = [
        [c["delta"].get("content") for c in json.loads(e)["choices"]]
        for e in sse_events(b"".join(writes).decode())[:-1]
    ]
    assert [c for c in contents if c and c[0]] != []  # the fake engine answered with text
    first = sse_events(writes[0].decode())
    assert [json.loads(e)["choices"][0]["delta"].get("content") for e in first] == ["", "hello"]
    assert len(writes) == 2  # the first token, then everything else in one write


def test_a_replica_set_hands_batches_on_and_fails_over_on_a_first_batch_error(
    tmp_path: Path,
) -> None:
    """The first-line failover holds for batches: a server error as the first line of the
    first batch moves the stream to the next replica; the batches of the answer pass as
    they are."""
    from test_replicas import URLS, Engine, by, home_and_next, replica_set, served

    store = AdapterStore(tmp_path / "store", max_rank=16)
    user = "user3"
    lora = random_lora(seed=3, r=8, targets=("q_proj",), layers=(0,), base_model=BASE_MODEL)
    store.publish_lora(Slot.user_served(user), lora)

    async def in_pairs(engine: Engine, body: dict[str, Any]) -> AsyncIterator[list[bytes]]:
        lines = [line async for line in engine.stream_chat(body)]
        for i in range(0, len(lines), 2):
            yield lines[i : i + 2]

    replicas, engines = replica_set(store, URLS)
    for engine in engines.values():
        engine.stream_chat_batches = partial(in_pairs, engine)  # type: ignore[attr-defined]
    home, fallback = home_and_next(user, engines)
    home.first_line = b'data: {"error":{"message":"dead","code":500}}'
    home.probe_ok = False

    async def main() -> list[list[bytes]]:
        async with replicas.use(user) as name:
            body = {"model": name or BASE_MODEL, "messages": []}
            return [batch async for batch in replicas.stream_chat_batches(body)]

    batches = asyncio.run(main())
    assert all(len(batch) <= 2 for batch in batches) and len(batches[0]) == 2
    answer = "".join(str(line) for batch in batches for line in batch)
    assert by(fallback, answer) and "dead" not in answer
    assert batches[-1][-1] == b"data: [DONE]"
    assert fallback.last["model"] == served(store, user)


def test_the_lean_path_only_where_httpx_would_not_do_more(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedpersona.service.engine.stream_http import supported

    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert supported("http://127.0.0.1:8000")
    assert not supported("https://vllm:8000")
    monkeypatch.setenv("HTTP_PROXY", "http://proxy:3128")
    assert not supported("http://vllm:8000")  # httpx would go through the proxy
    monkeypatch.setenv("NO_PROXY", "vllm")
    assert supported("http://vllm:8000")


def _answer(writer: asyncio.StreamWriter) -> None:
    writer.write(
        OK_HEAD + _chunk(b'data: {"n":0}\n\n') + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
    )


def test_a_kept_alive_connection_closed_as_it_is_reused_is_retried_once_on_a_new_one() -> None:
    """The engine's idle timer closing a connection just as the pool reuses it: no byte of
    answer came, the engine never took the request, so it goes once more on a new connection."""
    connections: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        served = 0
        while await _read_request(reader) is not None:
            if served == 1:
                break  # the second request on this connection: closed unanswered
            _answer(writer)
            await writer.drain()
            served += 1
        writer.close()

    async def main() -> list[list[bytes]]:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        c = EngineClient(url)
        try:
            assert c._lean is not None  # the lean path is the one under test
            return [[line async for line in c.stream_chat({})] for _ in range(2)]
        finally:
            await c.aclose()
            server.close()

    # Both answered; the second after a new connection (the reused one was closed unanswered).
    assert asyncio.run(main()) == [[b'data: {"n":0}', b"data: [DONE]"]] * 2
    assert len(connections) == 2


def test_a_new_connection_closed_unanswered_is_not_retried() -> None:
    tries: list[int] = []

    async def handler(request: bytes, writer: asyncio.StreamWriter) -> None:
        tries.append(1)
        writer.close()

    async def main(url: str) -> None:
        c = EngineClient(url)
        try:
            with pytest.raises(EngineUnavailable):
                async for _ in c.stream_chat({}):
                    pass
        finally:
            await c.aclose()

    asyncio.run(_serve(handler, main))
    assert tries == [1]
