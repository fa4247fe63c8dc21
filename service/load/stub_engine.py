"""A stand-in for vLLM's OpenAI server that answers at once: the gateway's cost with no engine.

`stub_engine_app(model=..., tokens=...)` is a Starlette app with the parts of vLLM's API the
gateway uses: streamed and whole chat completions shaped like vLLM's (compact JSON; a role
chunk, one chunk per token, a usage chunk when asked, `[DONE]`), runtime LoRA load and unload
(names tracked; an unknown model is a 404, as in vLLM), `/v1/models` and `/health`. Against it,
what a benchmark measures is the gateway's own relay cost, and a load test runs in seconds.
`token_delay_s` paces tokens, to stand for an engine of a given speed.

Run alone: `python -m fedpersona.service.load.stub_engine --port 8100 --model base`.
It checks no key and knows no adapter contents; it is a measuring tool, not an engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


@dataclass
class StubState:
    """What the stub saw: registered adapter names, requests per model, loads and unloads."""

    loaded: set[str] = field(default_factory=set)
    requests: Counter[str] = field(default_factory=Counter)
    loads: int = 0
    unloads: int = 0


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _not_found(model: str) -> JSONResponse:
    error = {"message": f"The model `{model}` does not exist.", "type": "NotFoundError"}
    return JSONResponse({"error": {**error, "param": "model", "code": 404}}, status_code=404)


def stub_engine_app(
    *, model: str, tokens: int = 32, token_delay_s: float = 0.0, state: StubState | None = None
) -> Starlette:
    """The stub as an ASGI app; `state` (optional) is filled as requests arrive."""
    seen = state if state is not None else StubState()

    async def chat(request: Request) -> Response:
        body = await request.json()
        name = body.get("model")
        if name != model and name not in seen.loaded:
            return _not_found(str(name))
        seen.requests[name] += 1
        count = min(int(body.get("max_tokens") or tokens), tokens)
        usage = {"prompt_tokens": 8, "completion_tokens": count, "total_tokens": count + 8}
        head = {"id": "chatcmpl-stub", "created": 1, "model": name}
        if not body.get("stream"):
            text = "".join(f" w{i}" for i in range(count))
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "finish_reason": "length"}
            answer = {**head, "object": "chat.completion", "choices": [choice], "usage": usage}
            return JSONResponse(answer)
        with_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        head["object"] = "chat.completion.chunk"

        async def stream() -> AsyncIterator[bytes]:
            delta: dict[str, Any] = {"role": "assistant", "content": ""}
            yield _event({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
            for i in range(count):
                if token_delay_s:
                    await asyncio.sleep(token_delay_s)
                choice = {"index": 0, "delta": {"content": f" w{i}"}, "finish_reason": None}
                yield _event({**head, "choices": [choice]})
            if with_usage:
                yield _event({**head, "choices": [], "usage": usage})
            yield b"data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def load(request: Request) -> Response:
        body = await request.json()
        seen.loaded.add(str(body["lora_name"]))
        seen.loads += 1
        return Response(f"Success: LoRA adapter '{body['lora_name']}' added successfully.")

    async def unload(request: Request) -> Response:
        name = str((await request.json())["lora_name"])
        if name not in seen.loaded:
            return _not_found(name)
        seen.loaded.discard(name)
        seen.unloads += 1
        return Response(f"Success: LoRA adapter '{name}' removed successfully.")

    async def models(request: Request) -> Response:
        cards = [{"id": name, "object": "model"} for name in (model, *sorted(seen.loaded))]
        return JSONResponse({"object": "list", "data": cards})

    async def health(request: Request) -> Response:
        return Response()

    routes = [
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/load_lora_adapter", load, methods=["POST"]),
        Route("/v1/unload_lora_adapter", unload, methods=["POST"]),
        Route("/v1/models", models),
        Route("/health", health),
    ]
    return Starlette(routes=routes)


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--model", required=True, help="the base model's served name")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per answer at most")
    parser.add_argument("--token-delay-ms", type=float, default=0.0)
    args = parser.parse_args()
    app = stub_engine_app(
        model=args.model, tokens=args.tokens, token_delay_s=args.token_delay_ms / 1000
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
