"""Connection-level attacks against a real gateway process (uvicorn with the gateway's own
configuration): slow headers, slow bodies, abandoned requests, too many connections."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from gateway_process import LiveGateway, SlowEngine, live_gateway


def _connect(gw: LiveGateway) -> socket.socket:
    return socket.create_connection((gw.host, gw.port), timeout=10)


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes `sock` within `seconds` (reads until EOF)."""
    sock.settimeout(seconds)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if sock.recv(4096) == b"":
                return True
    except (TimeoutError, OSError):
        return False
    return False


def _chat_request(gw: LiveGateway, body: bytes, *, length: int | None = None) -> bytes:
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {gw.keys['alice']}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length if length is not None else len(body)}\r\n\r\n"
    )
    return head.encode() + body


def test_half_sent_headers_are_cut_off(tmp_path: Path) -> None:
    with live_gateway(tmp_path, header_timeout_s=1.0) as gw:
        sockets = [_connect(gw) for _ in range(20)]
        for s in sockets:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        assert all(_closed_within(s, 5.0) for s in sockets)
        # A well-behaved client is served as before.
        assert httpx.get(f"{gw.root}/health").status_code == 200


def test_a_body_that_stops_arriving_is_a_408(tmp_path: Path) -> None:
    with live_gateway(tmp_path, body_timeout_s=1.0) as gw:
        sock = _connect(gw)
        sock.sendall(_chat_request(gw, b'{"model":', length=100))
        sock.settimeout(10)
        started = time.monotonic()
        answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert time.monotonic() - started < 5
        assert b"connection: close" in answer.lower()
        # Closed at once, not when the keep-alive timer (5 s) gives up on the unread body.
        assert _closed_within(sock, 2.0)
        assert gw.engine.started == 0


def test_an_abandoned_request_is_cancelled_in_the_engine(tmp_path: Path) -> None:
    with live_gateway(tmp_path, engine=SlowEngine(delay_s=30)) as gw:
        body = json.dumps(
            {"model": "security-base", "messages": [{"role": "user", "content": "x"}]}
        )
        for i in range(5):
            sock = _connect(gw)
            sock.sendall(_chat_request(gw, body.encode()))
            deadline = time.monotonic() + 10
            while gw.engine.started <= i and time.monotonic() < deadline:
                time.sleep(0.05)
            sock.close()
        deadline = time.monotonic() + 10
        while gw.engine.cancelled < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (gw.engine.started, gw.engine.cancelled, gw.engine.finished) == (5, 5, 0)


def test_connections_above_the_cap_get_503(tmp_path: Path) -> None:
    with live_gateway(tmp_path, max_connections=4, header_timeout_s=30) as gw:
        held = [_connect(gw) for _ in range(4)]
        for s in held:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # open, headers unfinished
        time.sleep(0.3)
        assert httpx.get(f"{gw.root}/health").status_code == 503
        for s in held:
            s.close()
        time.sleep(0.3)
        assert httpx.get(f"{gw.root}/health").status_code == 200


class StreamThenStall(SlowEngine):
    """Streams a role chunk and one token, then stalls; counts streams closed early."""

    closed_early: int = 0

    async def stream_chat(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        self.started += 1
        head = {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": body["model"]}
        for delta in ({"role": "assistant"}, {"content": "one"}):
            chunk = {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            yield b"data: " + json.dumps(chunk).encode()
        try:
            await asyncio.sleep(self.delay_s)
        except (asyncio.CancelledError, GeneratorExit):
            self.closed_early += 1
            raise
        self.finished += 1
        yield b"data: [DONE]"


def test_a_client_leaving_mid_stream_ends_the_engine_stream_and_frees_its_slot(
    tmp_path: Path,
) -> None:
    engine = StreamThenStall(delay_s=30)
    with live_gateway(tmp_path, engine=engine, max_in_flight_per_user=1) as gw:
        body = json.dumps(
            {
                "model": "security-base",
                "messages": [{"role": "user", "content": "x"}],
                "stream": True,
            }
        ).encode()
        for attempt in range(2):
            sock = _connect(gw)
            sock.sendall(_chat_request(gw, body))
            seen = b""
            while b'"one"' not in seen:  # the first token reached the client
                data = sock.recv(4096)
                assert data, seen
                seen += data
            assert b"200 OK" in seen.split(b"\r\n", 1)[0]
            sock.close()
            deadline = time.monotonic() + 10
            while engine.closed_early <= attempt and time.monotonic() < deadline:
                time.sleep(0.05)
            # Closed long before the engine's 30 s: the relay noticed and let go; the second
            # attempt (one stream allowed per user) shows the slot was given back.
            assert (engine.started, engine.closed_early, engine.finished) == (
                attempt + 1,
                attempt + 1,
                0,
            )
