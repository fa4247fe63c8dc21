"""`fedpersona serve --engine-url` as a real process: readiness, chat, graceful SIGTERM.

The engine is a small HTTP server speaking vLLM's OpenAI wire format (real sockets, real
uvicorn in a thread), slow enough that a stream is still running when the gateway gets SIGTERM.
The real-vLLM path is covered by `tests/integration/`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fedpersona.service.registry import Registry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

pytestmark = pytest.mark.slow

BASE = "fake-vllm-base"
CHUNKS = 8
CHUNK_DELAY_S = 0.25


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _health(_: Request) -> JSONResponse:
    return JSONResponse({})


async def _chat(request: Request) -> JSONResponse | StreamingResponse:
    body = await request.json()
    if not body.get("stream"):
        return JSONResponse(
            {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        )

    async def events() -> AsyncIterator[bytes]:
        import asyncio

        for i in range(CHUNKS):
            await asyncio.sleep(CHUNK_DELAY_S)
            chunk = {
                "id": "x",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": body["model"],
                "choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}],
            }
            yield f"data: {json.dumps(chunk)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


@pytest.fixture
def fake_vllm() -> Iterator[str]:
    app = Starlette(
        routes=[
            Route("/health", _health),
            Route("/v1/chat/completions", _chat, methods=["POST"]),
        ]
    )
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "fake vLLM did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_serve_answers_and_drains_streams_on_sigterm(fake_vllm: str, tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry.sqlite")
    registry.create_user("alice")
    key = registry.issue_key("alice").api_key
    port = _free_port()
    env = {
        **os.environ,
        "FEDPERSONA_ENVIRONMENT": "production",
        "FEDPERSONA_ADMIN_KEY": "a-long-random-admin-key-for-this-test",
        "FEDPERSONA_ENGINE__SERVED_MODEL_NAME": BASE,
        "FEDPERSONA_SHUTDOWN_GRACE_S": "20",
    }
    log = (tmp_path / "gateway.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedpersona",  # the `fedpersona` entry point
            "serve",
            "--home",
            str(tmp_path),
            "--port",
            str(port),
            "--engine-url",
            fake_vllm,
            "--no-rounds",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "gateway.log").read_text()
            try:
                if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "gateway.log").read_text()
            time.sleep(0.2)

        headers = {"Authorization": f"Bearer {key}"}
        body = {"model": "personal", "messages": [{"role": "user", "content": "hi"}]}
        answer = httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers, timeout=10)
        assert answer.status_code == 200 and answer.json()["model"] == "personal"

        events: list[str] = []
        with httpx.stream(
            "POST",
            f"{base}/v1/chat/completions",
            json={**body, "stream": True},
            headers=headers,
            timeout=30,
        ) as stream:
            for line in stream.iter_lines():
                if not line:
                    continue
                events.append(line)
                if len(events) == 1:
                    proc.send_signal(signal.SIGTERM)  # shut down while the stream runs
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
        assert len(chunks) == CHUNKS and {c["model"] for c in chunks} == {"personal"}
        # uvicorn re-raises the signal once it has shut down cleanly.
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    logged = (tmp_path / "gateway.log").read_text()
    assert "Waiting for application shutdown" in logged and "Finished server process" in logged
    assert "Traceback" not in logged


def test_serve_refuses_weak_admin_key_in_production(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fedpersona", "serve", "--home", str(tmp_path), "--no-rounds"],
        env={**os.environ, "FEDPERSONA_ENVIRONMENT": "production", "FEDPERSONA_ADMIN_KEY": ""},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "admin_key" in result.stderr
