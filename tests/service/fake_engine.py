"""A hand-written fake of `fedpersona.service.engine.client.EngineClient` for the gateway's fast
tests.

It records every body it receives (so tests can assert what reached "vLLM"), answers like vLLM's
OpenAI server (echoing the `model` it was asked for, as vLLM does), and can be switched into
failure modes: down, an error status, or a stream that breaks after some chunks.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fedpersona.service.errors import EngineRequestError, EngineUnavailable


@dataclass
class FakeEngine:
    reply: str = "hello from the fake engine"
    down: bool = False
    error: EngineRequestError | None = None
    fail_stream_after: int | None = None  # raise EngineUnavailable after this many chunks
    chunk_delay_s: float = 0.0
    received: list[dict[str, Any]] = field(default_factory=list)
    loaded: dict[str, str] = field(default_factory=dict)  # lora name -> path
    load_calls: list[tuple[str, str]] = field(default_factory=list)
    unload_calls: list[str] = field(default_factory=list)
    closed: bool = False
    streams_closed: int = 0  # streams that ended, finished or abandoned

    def _admit(self, body: dict[str, Any]) -> None:
        if self.down:
            raise EngineUnavailable("fake engine is down")
        self.received.append(json.loads(json.dumps(body)))  # a deep copy, as over the wire
        if self.error is not None:
            raise self.error
        model = body.get("model")
        if model != BASE_MODEL and model not in self.loaded:
            # What vLLM answers for an unknown model / unloaded adapter.
            raise EngineRequestError(
                404,
                {
                    "error": {
                        "message": f"The model `{model}` does not exist.",
                        "type": "NotFoundError",
                        "param": "model",
                        "code": 404,
                    }
                },
            )

    @property
    def last(self) -> dict[str, Any]:
        return self.received[-1]

    def _tokens(self) -> list[str]:
        return self.reply.split(" ")

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        self._admit(body)
        tokens = self._tokens()
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": self.reply},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": 7,
                "completion_tokens": len(tokens),
                "total_tokens": 7 + len(tokens),
            },
        }

    def stream_chat(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        return self._stream(body)

    async def _stream(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        self._admit(body)
        model = body["model"]
        include_usage = bool(body.get("stream_options", {}).get("include_usage"))
        tokens = self._tokens()
        base = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": model,
        }

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            # Like vLLM: content chunks carry no "usage" key; only the final one has usage.
            payload = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return b"data: " + _compact(payload)

        pieces = [chunk({"role": "assistant", "content": ""})]
        pieces += [chunk({"content": (" " if i else "") + t}) for i, t in enumerate(tokens)]
        pieces.append(chunk({}, "stop"))
        if include_usage:
            usage = {
                "prompt_tokens": 7,
                "completion_tokens": len(tokens),
                "total_tokens": 7 + len(tokens),
            }
            pieces.append(b"data: " + _compact({**base, "choices": [], "usage": usage}))
        try:
            for i, piece in enumerate(pieces):
                if self.fail_stream_after is not None and i >= self.fail_stream_after:
                    raise EngineUnavailable("fake engine died mid-stream")
                if self.chunk_delay_s:
                    await asyncio.sleep(self.chunk_delay_s)
                yield piece
            yield b"data: [DONE]"
        finally:
            self.streams_closed += 1

    async def load_lora(self, name: str, path: str, *, replace: bool = False) -> None:
        if self.down:
            raise EngineUnavailable("fake engine is down")
        self.load_calls.append((name, path))
        self.loaded[name] = path

    async def unload_lora(self, name: str) -> None:
        if self.down:
            raise EngineUnavailable("fake engine is down")
        self.unload_calls.append(name)
        self.loaded.pop(name, None)

    async def health(self) -> bool:
        return not self.down

    async def aclose(self) -> None:
        self.closed = True


BASE_MODEL = "fedpersona-test-base"


def _compact(payload: dict[str, Any]) -> bytes:
    """Serialized the way vLLM writes stream chunks: compact, no spaces."""
    return json.dumps(payload, separators=(",", ":")).encode()
