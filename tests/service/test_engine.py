"""EngineClient against httpx's mock transport (wire format) and a closed port (transport errors).

The same client is exercised against a real vLLM server in tests/integration/.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

import httpx
import pytest
from fedpersona.service.engine.client import EngineClient
from fedpersona.service.errors import EngineRequestError, EngineUnavailable

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def client(handler: Callable[[httpx.Request], httpx.Response], **kw: Any) -> EngineClient:
    return EngineClient("http://engine", transport=httpx.MockTransport(handler), **kw)


def vllm_error(status: int, message: str, param: str | None = None) -> httpx.Response:
    body = {
        "error": {"message": message, "type": "BadRequestError", "param": param, "code": status}
    }
    return httpx.Response(status, json=body)


def test_chat_posts_the_body_and_returns_json() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"model": "m", "choices": []})

    async def main() -> dict[str, Any]:
        c = client(handler)
        try:
            return await c.chat({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        finally:
            await c.aclose()

    assert run(main()) == {"model": "m", "choices": []}
    assert seen[0].url.path == "/v1/chat/completions"
    assert json.loads(seen[0].content)["messages"][0]["content"] == "hi"


def test_error_status_becomes_engine_request_error_with_envelope() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return vllm_error(400, "too long", param="input_tokens")

    async def main() -> EngineRequestError:
        c = client(handler)
        with pytest.raises(EngineRequestError) as err:
            await c.chat({"model": "m"})
        await c.aclose()
        return err.value

    err = run(main())
    assert err.status == 400 and err.param == "input_tokens" and err.message == "too long"
    assert err.to_gateway_error().status == 400


def test_non_json_error_body_is_wrapped_in_an_envelope() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, text="Internal Server Error")

    async def main() -> EngineRequestError:
        c = client(handler)
        with pytest.raises(EngineRequestError) as err:
            await c.chat({})
        await c.aclose()
        return err.value

    err = run(main())
    assert err.status == 500 and err.message == "Internal Server Error"
    assert err.envelope["error"]["code"] == 500


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_engine_is_unavailable() -> None:
    async def main() -> None:
        c = EngineClient(f"http://127.0.0.1:{free_port()}")
        with pytest.raises(EngineUnavailable):
            await c.chat({})
        with pytest.raises(EngineUnavailable):
            async for _ in c.stream_chat({}):
                pass
        with pytest.raises(EngineUnavailable):
            await c.load_lora("a", "/x")
        assert await c.health() is False
        assert c.in_flight == 0
        await c.aclose()

    run(main())


def sse(chunks: list[bytes]) -> Callable[[httpx.Request], httpx.Response]:
    async def body() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body(), headers={"content-type": "text/event-stream"})

    return handler


def test_stream_yields_sse_lines_whatever_the_chunking() -> None:
    raw = b'data: {"a": 1}\n\ndata: {"b": "x\\ny"}\r\n\r\ndata: [DONE]\n\n'
    expected = [b'data: {"a": 1}', b'data: {"b": "x\\ny"}', b"data: [DONE]"]

    async def collect(chunks: list[bytes]) -> list[bytes]:
        c = client(sse(chunks))
        lines = [line async for line in c.stream_chat({"stream": True})]
        assert c.in_flight == 0
        await c.aclose()
        return lines

    assert run(collect([raw])) == expected
    assert run(collect([raw[i : i + 1] for i in range(len(raw))])) == expected
    assert run(collect([raw[:5], raw[5:23], raw[23:]])) == expected
    assert run(collect([raw.rstrip(b"\n")])) == expected  # no final newline


def test_stream_error_status_raises_before_any_line() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return vllm_error(404, "The model `u-x` does not exist.", param="model")

    async def main() -> None:
        c = client(handler)
        with pytest.raises(EngineRequestError) as err:
            async for _ in c.stream_chat({}):
                pytest.fail("no line may be yielded")
        assert err.value.status == 404
        assert c.in_flight == 0
        await c.aclose()

    run(main())


def test_stream_closed_early_is_no_longer_in_flight() -> None:
    async def main() -> None:
        c = client(sse([b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"]))
        stream = c.stream_chat({})
        assert await anext(stream) == b"data: 1"
        assert c.in_flight == 1
        assert not await c.wait_idle(0.01)
        await stream.aclose()  # type: ignore[attr-defined]  # the client went away
        assert c.in_flight == 0
        assert await c.wait_idle(0.01)
        await c.aclose()

    run(main())


def test_adapter_calls_and_their_errors() -> None:
    seen: list[tuple[str, dict[str, Any]]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append((request.url.path, body))
        if body["lora_name"] == "gone":
            return vllm_error(404, "cannot be found")
        if body["lora_name"] == "bad":
            return vllm_error(500, "bad adapter")
        return httpx.Response(200, text="Success")

    async def main() -> None:
        c = client(handler)
        await c.load_lora("u-a-1", "/store/a")
        await c.load_lora("u-a-1", "/store/a", replace=True)
        await c.unload_lora("u-a-1")
        await c.unload_lora("gone")  # already gone: fine
        with pytest.raises(EngineRequestError):
            await c.unload_lora("bad")
        with pytest.raises(EngineRequestError):
            await c.load_lora("bad", "/store/bad")
        await c.aclose()

    run(main())
    assert seen[0] == ("/v1/load_lora_adapter", {"lora_name": "u-a-1", "lora_path": "/store/a"})
    assert seen[1][1]["load_inplace"] is True
    assert seen[2] == ("/v1/unload_lora_adapter", {"lora_name": "u-a-1"})


def test_health_and_models() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200)
        return httpx.Response(200, json={"data": [{"id": "base"}, {"id": "u-a-1"}]})

    async def main() -> tuple[bool, list[str]]:
        c = client(handler)
        result = await c.health(), await c.models()
        await c.aclose()
        return result

    assert run(main()) == (True, ["base", "u-a-1"])


def test_gate_refuses_before_sending() -> None:
    sent: list[httpx.Request] = []

    def gate() -> None:
        raise EngineUnavailable("restarting", retry_after=3)

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json={})

    async def main() -> None:
        c = client(handler, gate=gate)
        with pytest.raises(EngineUnavailable, match="restarting"):
            await c.chat({})
        with pytest.raises(EngineUnavailable):
            async for _ in c.stream_chat({}):
                pass
        # Adapter loads go through the same gate: a restarting engine loads nothing.
        with pytest.raises(EngineUnavailable):
            await c.load_lora("u-a-1", "/store/x")
        with pytest.raises(EngineUnavailable):
            await c.unload_lora("u-a-1")
        assert await c.health()  # health bypasses the gate
        assert c.in_flight == 0
        await c.aclose()

    run(main())
    assert [r.url.path for r in sent] == ["/health"]


def test_every_engine_request_carries_the_engine_key() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"data": []})

    async def main() -> None:
        c = client(handler, api_key="engine-secret")
        await c.chat({})
        await c.load_lora("u-a-1", "/p")
        await c.unload_lora("u-a-1")
        await c.models()
        await c.health()
        await c.aclose()

    run(main())
    assert len(seen) == 5
    assert {r.headers.get("authorization") for r in seen} == {"Bearer engine-secret"}


VLLM_CHUNK = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,'
    b'"model":"u-alice-0123456789abcdef","choices":[{"index":0,"delta":{"content":"hi \\"model\\":'
    b'\\"u-alice-0123456789abcdef\\""},"logprobs":null,"finish_reason":null,"token_ids":null}]}'
)


def test_renamed_chunk_rewrites_only_the_model_key() -> None:
    from fedpersona.service.engine.client import chunk_has_content, renamed_chunk

    out = renamed_chunk(
        VLLM_CHUNK, engine_model="u-alice-0123456789abcdef", public_model="personal"
    )
    assert out is not None and out.endswith(b"\n\n")
    event = json.loads(out[len(b"data: ") :])
    original = json.loads(VLLM_CHUNK[len(b"data: ") :])
    assert event["model"] == "personal"
    # The (escaped) name inside generated text is left alone: only the key changed.
    assert event["choices"] == original["choices"]
    assert chunk_has_content(VLLM_CHUNK)
    assert not chunk_has_content(VLLM_CHUNK.replace(b'"content":"hi', b'"content":"", "x":"'))


def test_renamed_chunk_escapes_the_public_name() -> None:
    from fedpersona.service.engine.client import renamed_chunk

    line = b'data: {"model":"u-a-0123456789abcdef","choices":[]}'
    out = renamed_chunk(line, engine_model="u-a-0123456789abcdef", public_model='my "bot"')
    assert out is not None
    assert json.loads(out[len(b"data: ") :])["model"] == 'my "bot"'


@pytest.mark.parametrize(
    "line",
    [
        b"data: [DONE]",
        b'data: {"model":"u-a-0123456789abcdef","choices":[],"usage":{"prompt_tokens":1}}',
        b'data: {"error":{"message":"boom"},"model":"u-a-0123456789abcdef"}',
        b'data: {"model": "u-a-0123456789abcdef","choices":[]}',  # not vLLM's compact form
        b'data: {"model":"other","choices":[]}',
        b'data: {"model":"u-a-0123456789abcdef","x":{"model":"u-a-0123456789abcdef"}}',
        b": keep-alive comment",
    ],
)
def test_renamed_chunk_leaves_everything_else_to_the_json_path(line: bytes) -> None:
    from fedpersona.service.engine.client import renamed_chunk

    assert renamed_chunk(line, engine_model="u-a-0123456789abcdef", public_model="p") is None


def test_stream_read_to_done_reuses_the_connection() -> None:
    """A caller stops at [DONE]; the client must still let the connection go back to the pool."""
    events = [b'data: {"n":1}\n\n', b"data: [DONE]\n\n"]

    async def main() -> tuple[int, list[list[bytes]]]:
        accepted = 0

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal accepted
            accepted += 1
            while True:  # keep-alive: one request after another on this connection
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    writer.close()
                    return  # the client closed the connection
                length = next(
                    int(h.split(b":")[1])
                    for h in head.split(b"\r\n")
                    if h.lower().startswith(b"content-length")
                )
                await reader.readexactly(length)
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"transfer-encoding: chunked\r\n\r\n"
                )
                for event in events:
                    writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
                await writer.drain()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        c = EngineClient(f"http://127.0.0.1:{port}")
        seen = []
        for _ in range(3):
            lines = []
            async for line in c.stream_chat({}):
                lines.append(line)
                if line == b"data: [DONE]":
                    break  # what the gateway's relay does
            seen.append(lines)
        await c.aclose()
        server.close()
        await server.wait_closed()
        return accepted, seen

    accepted, seen = run(main())
    assert seen == [[b'data: {"n":1}', b"data: [DONE]"]] * 3
    assert accepted == 1
