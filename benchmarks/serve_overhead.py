"""What the gateway costs: the same streamed load sent straight to vLLM and through the gateway.

One run starts one vLLM server (through `EngineSupervisor`, as `fedpersona serve` does; or uses
`--engine-url`), publishes one random LoRA per user, starts the full gateway app in its own
process (uvicorn), and sends identical greedy requests with `--concurrency` concurrent streams,
alternating rounds: direct to vLLM with the versioned adapter names, and through the gateway with
each user's API key and the `personal` alias. Greedy decoding makes both paths generate the
same tokens, so the work is identical.

Reports the throughput ratio (gateway / direct completion tokens per second, target >= 0.95) and
the added time to first token (p50 of gateway TTFT minus p50 of direct TTFT, target <= 5 ms)
under that load, plus the added TTFT of single requests (direct and gateway interleaved one at a
time: the median of the paired differences), which load noise does not swamp. Prints a table
and writes `benchmarks/results/serve_overhead.json` and `.png`.

With `--instant-engine` vLLM is replaced by a stand-in that streams at once, so what remains is
the gateway's own cost (results in `serve_overhead_instant.json`).

    python benchmarks/serve_overhead.py                       # micro test model, own vLLM
    python benchmarks/serve_overhead.py --instant-engine      # the gateway's own cost
    python benchmarks/serve_overhead.py --model-dir .fedpersona/models/large --requests 256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fedpersona.adapters import AdapterStore, LoraAdapter, Slot  # noqa: E402
from fedpersona.adapters.manifest import model_name  # noqa: E402
from fedpersona.adapters.refs import engine_adapter_name as adapter_name  # noqa: E402
from fedpersona.service.engine.config import EngineSettings, build_launch  # noqa: E402
from fedpersona.service.engine.supervisor import EngineSupervisor  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
ADMIN_KEY = "benchmark-admin-key-0123456789abcdef"
PROMPTS = [
    "Tell me about the sea.",
    "What is the best way to learn a language?",
    "Describe your favourite meal.",
    "How do bridges stay up?",
    "Write a short poem about autumn.",
    "Why is the sky blue?",
    "Give me advice for a job interview.",
    "What happened in the story of the old king?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def random_lora(model_dir: Path, base_model: str, seed: int, r: int = 8) -> LoraAdapter:
    config = json.loads((model_dir / "config.json").read_text())
    hidden = config["hidden_size"]
    heads_out = config["num_attention_heads"] * config.get(
        "head_dim", hidden // config["num_attention_heads"]
    )
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module, fan_in, fan_out in (
            ("q_proj", hidden, heads_out),
            ("o_proj", heads_out, hidden),
        ):
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, fan_in, generator=gen) / fan_in**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, r, generator=gen) * 0.2
    return LoraAdapter(
        r=r,
        alpha=float(2 * r),
        target_modules=("o_proj", "q_proj"),
        base_model=base_model,
        tensors=tensors,
    )


# ---------------------------------------------------------------------------- gateway child


def gateway_main(config_path: str) -> None:
    """Child-process mode: serve the full gateway app (same factory as `fedpersona serve`)."""
    import uvicorn
    from fedpersona.service.http.app import create_app
    from fedpersona.service.settings import Settings

    config = json.loads(Path(config_path).read_text())
    settings = Settings.model_validate(
        {
            "home": Path(config["home"]),
            "admin_key": ADMIN_KEY,
            "rate_limit_rpm": 0,
            "engine": {
                "url": config["engine_url"],
                "served_model_name": config["model"],
                "max_model_len": config["max_model_len"],
                "max_cpu_loras": config["max_cpu_loras"],
                "max_loras": config["max_loras"],
            },
        }
    )
    uvicorn.run(
        create_app(settings),
        host="127.0.0.1",
        port=config["port"],
        log_level="warning",
        access_log=False,
    )


def instant_engine_main(port: int, tokens: int) -> None:
    """Child-process mode: an engine stand-in that streams `tokens` chunks at once, shaped like
    vLLM's (compact JSON, role chunk, content chunks, usage chunk, [DONE]). Against it the
    measured difference is the gateway's own cost, with no engine time to hide it."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    def event(payload: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"

    async def chat(request: Request) -> Response:
        model = (await request.json())["model"]
        head = {"id": "chatcmpl-0", "object": "chat.completion.chunk", "created": 1, "model": model}

        async def stream() -> Any:
            delta: dict[str, Any] = {"role": "assistant", "content": ""}
            yield event({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
            for i in range(tokens):
                delta = {"content": f" w{i}"}
                yield event(
                    {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
                )
            usage = {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": tokens + 8}
            yield event({**head, "choices": [], "usage": usage})
            yield b"data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def ok(request: Request) -> Response:
        return Response("ok")

    routes = [
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/load_lora_adapter", ok, methods=["POST"]),
        Route("/v1/unload_lora_adapter", ok, methods=["POST"]),
        Route("/health", ok),
    ]
    uvicorn.run(Starlette(routes=routes), host="127.0.0.1", port=port, log_level="warning")


# ---------------------------------------------------------------------------- load generator


@dataclass
class Sample:
    ttft_s: float
    total_s: float
    tokens: int
    error: str | None = None


async def one_stream(
    client: httpx.AsyncClient, url: str, key: str | None, body: dict[str, Any]
) -> Sample:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    started = time.perf_counter()
    ttft = None
    tokens = 0
    async with client.stream("POST", url, json=body, headers=headers) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"{url}: {response.status_code} {response.text[:300]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = int(event["usage"]["completion_tokens"])
            if ttft is None and any(
                (c.get("delta") or {}).get("content") for c in event.get("choices") or ()
            ):
                ttft = time.perf_counter() - started
    total = time.perf_counter() - started
    return Sample(ttft_s=ttft if ttft is not None else total, total_s=total, tokens=tokens)


async def run_round(
    *, url: str, jobs: Sequence[tuple[str | None, dict[str, Any]]], concurrency: int
) -> tuple[list[Sample], float]:
    queue: asyncio.Queue[tuple[str | None, dict[str, Any]]] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    samples: list[Sample] = []
    limits = httpx.Limits(
        max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2
    )
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                key, body = queue.get_nowait()
                started = time.perf_counter()
                try:
                    samples.append(await one_stream(client, url, key, body))
                except (httpx.HTTPError, RuntimeError) as e:
                    took = time.perf_counter() - started
                    samples.append(Sample(took, took, 0, error=f"{type(e).__name__}: {e}"))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return samples, wall


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize(samples: list[Sample], wall: float) -> dict[str, float]:
    failed = [s for s in samples if s.error is not None]
    for sample in failed[:3]:
        print(f"  request failed: {sample.error}", flush=True)
    samples = [s for s in samples if s.error is None]
    tokens = sum(s.tokens for s in samples)
    ttft = [s.ttft_s * 1000 for s in samples]
    return {
        "requests": len(samples),
        "errors": len(failed),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50_ms": statistics.median(ttft),
        "ttft_p90_ms": pct(ttft, 0.9),
        "latency_p50_ms": statistics.median(s.total_s * 1000 for s in samples),
    }


# ---------------------------------------------------------------------------- orchestration


async def wait_healthy(url: str) -> None:
    async with httpx.AsyncClient() as probe:
        for _ in range(600):
            try:
                if (await probe.get(f"{url}/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not start")


async def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="fedpersona-bench-"))
    model_dir = args.model_dir.resolve()
    model = model_name(model_dir)
    supervisor = None
    started = time.monotonic()
    stand_in = None
    if args.instant_engine:
        port = free_port()
        stand_in = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--_instant_engine",
                str(port),
                "--max-tokens",
                str(args.max_tokens),
            ],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        engine_url = f"http://127.0.0.1:{port}"
        await wait_healthy(engine_url)
    elif args.engine_url:
        engine_url = args.engine_url.rstrip("/")
    else:
        settings = EngineSettings(
            model_dir=model_dir,
            port=free_port(),
            max_loras=args.max_loras,
            max_cpu_loras=max(args.users, args.max_loras),
            max_model_len=args.max_model_len,
        )
        launch = build_launch(settings, home=home)
        supervisor = EngineSupervisor(launch, log_path=home / "logs" / "vllm.log")
        print(f"starting vLLM on {model_dir} (log: {supervisor.log_path}) ...", flush=True)
        await supervisor.start()
        await supervisor.wait_ready(timeout=1800)
        engine_url = launch.base_url
    ready_s = time.monotonic() - started

    store = AdapterStore(home / "store", max_rank=16)
    from fedpersona.service.registry import Registry

    registry = Registry(home / "registry.sqlite")
    users = [f"user{i}" for i in range(args.users)]
    keys, names = {}, {}
    for i, user in enumerate(users):
        version = store.publish_lora(Slot.user_served(user), random_lora(model_dir, model, seed=i))
        registry.create_user(user)
        keys[user] = registry.issue_key(user).api_key
        names[user] = adapter_name(user, version.id)

    port = free_port()
    config = home / "gateway.json"
    config.write_text(
        json.dumps(
            {
                "home": str(home),
                "engine_url": engine_url,
                "model": model,
                "max_model_len": args.max_model_len,
                "max_cpu_loras": max(args.users, args.max_loras),
                "max_loras": args.max_loras,
                "port": port,
            }
        )
    )
    gateway = subprocess.Popen(
        [sys.executable, __file__, "--_gateway", str(config)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        gateway_url = f"http://127.0.0.1:{port}"
        await wait_healthy(gateway_url)

        def body(i: int, model_id: str) -> dict[str, Any]:
            return {
                "model": model_id,
                "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "max_tokens": args.max_tokens,
                "temperature": 0.0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }

        user_of = [users[i % len(users)] for i in range(args.requests)]
        gateway_jobs = [(keys[u], body(i, "personal")) for i, u in enumerate(user_of)]
        direct_jobs = [(None, body(i, names[u])) for i, u in enumerate(user_of)]
        # Warm up: loads every adapter through the gateway, compiles/caches what vLLM caches.
        await run_round(
            url=f"{gateway_url}/v1/chat/completions",
            jobs=gateway_jobs[: len(users) * 2],
            concurrency=args.concurrency,
        )
        await run_round(
            url=f"{engine_url}/v1/chat/completions",
            jobs=direct_jobs[: len(users) * 2],
            concurrency=args.concurrency,
        )

        rounds: dict[str, list[dict[str, float]]] = {"direct": [], "gateway": []}
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds} ...", flush=True)
            samples, wall = await run_round(
                url=f"{engine_url}/v1/chat/completions",
                jobs=direct_jobs,
                concurrency=args.concurrency,
            )
            rounds["direct"].append(summarize(samples, wall))
            samples, wall = await run_round(
                url=f"{gateway_url}/v1/chat/completions",
                jobs=gateway_jobs,
                concurrency=args.concurrency,
            )
            rounds["gateway"].append(summarize(samples, wall))
        # Unloaded added latency: one request at a time, direct and gateway interleaved, so
        # both see the same engine state; the median of the paired TTFT differences.
        print(f"paired single requests x {args.paired} ...", flush=True)
        diffs = []
        async with httpx.AsyncClient(timeout=600) as single:
            for i in range(args.paired):
                (gkey, gbody), (_, dbody) = gateway_jobs[i], direct_jobs[i]
                pair = [
                    ("d", f"{engine_url}/v1/chat/completions", None, dbody),
                    ("g", f"{gateway_url}/v1/chat/completions", gkey, gbody),
                ]
                if i % 2:
                    pair.reverse()
                ttft = {}
                for tag, url, key, body_ in pair:
                    ttft[tag] = (await one_stream(single, url, key, body_)).ttft_s
                diffs.append((ttft["g"] - ttft["d"]) * 1000)
    finally:
        gateway.terminate()
        gateway.wait(30)
        if supervisor is not None:
            await supervisor.stop(5)
        if stand_in is not None:
            stand_in.terminate()
            stand_in.wait(30)

    def med(path: str, key: str) -> float:
        return statistics.median(r[key] for r in rounds[path])

    direct_tps, gateway_tps = med("direct", "tokens_per_s"), med("gateway", "tokens_per_s")
    result = {
        "benchmark": "serve_overhead",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_avg_1m": os.getloadavg()[0],
        },
        "model": str(model_dir),
        "engine": (
            "instant stand-in (gateway cost only)"
            if args.instant_engine
            else "external vLLM"
            if args.engine_url
            else "supervised vLLM"
        ),
        "vllm_ready_s": None if args.engine_url or args.instant_engine else ready_s,
        "config": {
            k: v for k, v in vars(args).items() if not k.startswith("_") and k != "model_dir"
        },
        "rounds": rounds,
        "throughput_ratio": gateway_tps / direct_tps,
        "added_ttft_p50_ms": med("gateway", "ttft_p50_ms") - med("direct", "ttft_p50_ms"),
        "paired_added_ttft_ms": {
            "n": len(diffs),
            "median": statistics.median(diffs),
            "p90": pct(diffs, 0.9),
        },
        "targets": {"throughput_ratio": ">= 0.95", "added_ttft_p50_ms": "<= 5"},
    }
    return result


def report(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="gateway overhead (medians over rounds)")
    for column in (
        "path",
        "tok/s",
        "TTFT p50 ms",
        "TTFT p90 ms",
        "latency p50 ms",
        "requests/round",
        "errors",
    ):
        table.add_column(column, justify="right")
    for path in ("direct", "gateway"):
        rows = result["rounds"][path]

        def med(key: str, rows: list[dict[str, float]] = rows) -> float:
            return statistics.median(r[key] for r in rows)

        table.add_row(
            path,
            f"{med('tokens_per_s'):.1f}",
            f"{med('ttft_p50_ms'):.1f}",
            f"{med('ttft_p90_ms'):.1f}",
            f"{med('latency_p50_ms'):.1f}",
            f"{int(med('requests'))}",
            f"{sum(int(r['errors']) for r in rows)}",
        )
    console = Console()
    console.print(table)
    console.print(
        f"throughput ratio gateway/direct: {result['throughput_ratio']:.3f} (target >= 0.95); "
        f"added TTFT p50: {result['added_ttft_p50_ms']:.2f} ms (target <= 5)"
    )
    paired = result["paired_added_ttft_ms"]
    console.print(
        f"unloaded (one request at a time, {paired['n']} pairs): added TTFT median "
        f"{paired['median']:.2f} ms, p90 {paired['p90']:.2f} ms"
    )
    if result["vllm_ready_s"] is not None:
        console.print(f"vLLM ready after {result['vllm_ready_s']:.1f} s")


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, label in (
        (axes[0], "tokens_per_s", "tokens/s"),
        (axes[1], "ttft_p50_ms", "TTFT p50 (ms)"),
    ):
        for i, path_name in enumerate(("direct", "gateway")):
            values = [r[key] for r in result["rounds"][path_name]]
            ax.scatter([i] * len(values), values, label=path_name)
        ax.set_xticks([0, 1], ["direct", "gateway"])
        ax.set_title(label)
    ratio, added = result["throughput_ratio"], result["added_ttft_p50_ms"]
    fig.suptitle(f"gateway/direct throughput {ratio:.3f}, added TTFT p50 {added:.2f} ms")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--_gateway", help=argparse.SUPPRESS)
    parser.add_argument(
        "--model-dir", type=Path, help="large model dir (default: the micro test model)"
    )
    parser.add_argument("--_instant_engine", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--engine-url", help="use a running vLLM instead of starting one")
    parser.add_argument(
        "--instant-engine",
        action="store_true",
        help="replace vLLM by a stand-in that answers at once: measures the gateway's own cost",
    )
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--requests", type=int, default=128, help="requests per round and path")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--paired", type=int, default=32, help="single requests per path")
    parser.add_argument("--max-loras", type=int, default=4)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/serve_overhead*.json")
    args = parser.parse_args()
    if args._gateway:
        gateway_main(args._gateway)
        return 0
    if args._instant_engine:
        instant_engine_main(args._instant_engine, args.max_tokens)
        return 0
    if args.model_dir is None:
        from fedpersona.trainer.models.basemodel import MICRO, build_models

        args.model_dir = build_models(
            REPO / ".cache" / "models" / f"micro-{MICRO.hash()}", MICRO, progress=False
        ).large.path
    if args.out is None:
        name = "serve_overhead_instant.json" if args.instant_engine else "serve_overhead.json"
        args.out = RESULTS / name
    result = asyncio.run(benchmark(args))
    report(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
