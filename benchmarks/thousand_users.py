"""A thousand users, each with their own adapter, against a vLLM with a small adapter cache.

A real vLLM (micro model, CPU build, `--max-loras`/`--max-cpu-loras` small) behind a real
`fedpersona serve` process; `--users` users each get their own published LoRA. Three phases of
the same closed-loop load (`--streams` streams, `--seconds` each), through the gateway:

- `shared`: every request from one user, so one adapter serves all (the baseline);
- `uniform`: each request from a user drawn uniformly from all of them;
- `zipf`: users drawn by Zipf popularity (exponent `--zipf-s`).

Reports completion tokens per second and its ratio to `shared` (target >= 0.8), errors (target
0), TTFT p50/p95, adapter loads the gateway made (its `/metrics`), the hit rate of an LRU of
vLLM's CPU cache size replayed on the requests' adapter sequence (vLLM does not export its own),
and the gateway's resident memory sampled every 2 s (target: flat).

First contact: the phases start with no user (but the first) ever asked. The gateway preloads
(`adapter_preload`, here `--preload`, default every user): at start-up it registers the most
recently published users' adapters in vLLM, one at a time, so a user's first request does not
pay a runtime load (vLLM's LRU of `--max-cpu-loras` still bounds adapter memory, as in steady
state); the phases start once vLLM lists them all (the time it took is reported).
`--preload 0` measures first contact without it (a runtime load per first request).

    python benchmarks/thousand_users.py                     # 1,000 users, 3 x 45 s
    python benchmarks/thousand_users.py --users 200 --seconds 20
    python benchmarks/thousand_users.py --phases shared,uniform --preload 0
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness
from fedpersona.adapters.manifest import model_name
from fedpersona.service.load.client import Caller, Record, Workload, chat_body, run_load, send

PHASES = ("shared", "uniform", "zipf")


def lru_hit_rate(records: list[Record], size: int) -> float | None:
    """Hits of an LRU cache of `size` adapters replayed on the adapters requests asked for."""
    cache: OrderedDict[str, None] = OrderedDict()
    hits = total = 0
    for record in sorted(records, key=lambda r: r.started):
        key = record.user
        total += 1
        if key in cache:
            hits += 1
            cache.move_to_end(key)
        else:
            cache[key] = None
            if len(cache) > size:
                cache.popitem(last=False)
    return hits / total if total else None


async def adapter_loads(gateway_url: str) -> float:
    return await harness.counter(gateway_url, "fedpersona_adapter_loads")


async def touch_all(gateway_url: str, callers: list[Caller], *, streams: int) -> int:
    """One one-token request per user, `streams` at a time: every adapter registered in vLLM,
    so the phases measure steady state rather than first loads. Returns the failures."""
    slots = asyncio.Semaphore(streams)
    workload = Workload(duration_s=1, max_tokens=1)

    async with httpx.AsyncClient(timeout=120) as client:

        async def one(n: int, caller: Caller) -> bool:
            async with slots:
                body = chat_body(workload, caller, n)
                return (await send(client, gateway_url, caller, body)).ok

        done = await asyncio.gather(*(one(n, c) for n, c in enumerate(callers)))
    return sum(not ok for ok in done)


async def wait_preloaded(engine_url: str, count: int, timeout_s: float = 900) -> dict[str, Any]:
    """Wait until vLLM lists `count` adapters (the gateway's start-up preload)."""
    started = time.monotonic()
    held = 0
    while time.monotonic() - started < timeout_s:
        held = len(await harness.registered(engine_url)) - 1  # less the base model
        if held >= count:
            break
        await asyncio.sleep(1.0)
    return {"adapters": held, "seconds": time.monotonic() - started}


async def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    model_dir = harness.micro_model_dir()
    model = model_name(model_dir)
    home = harness.temp_home("thousand", args.home)
    users = [f"user{i:04d}" for i in range(args.users)]
    started = time.monotonic()
    published = harness.publish_users(home, users, model_dir=model_dir, model=model)
    print(f"published {len(users)} adapters in {time.monotonic() - started:.0f} s", flush=True)
    callers = published.callers()
    phases: dict[str, Any] = {}
    preload = args.users if args.preload is None else args.preload
    env = {
        "FEDPERSONA_ENGINE__MAX_CPU_LORAS": str(args.max_cpu_loras),
        "FEDPERSONA_ADAPTER_PRELOAD": str(preload),
    }
    warmed: dict[str, Any] = {"adapters": 0, "seconds": None}
    async with harness.vllm(
        model_dir,
        home,
        max_loras=args.max_loras,
        max_cpu_loras=args.max_cpu_loras,
        max_model_len=args.max_model_len,
    ) as (engine_url, _):
        with harness.gateway(
            home,
            model=model,
            engine_url=engine_url,
            engine_key=harness.ENGINE_KEY,
            max_model_len=args.max_model_len,
            env=env,
        ) as (gateway_url, gateway_proc):
            if preload:
                warmed = await wait_preloaded(engine_url, min(preload, args.users))
                print(
                    f"gateway preloaded {warmed['adapters']} adapters in {warmed['seconds']:.0f} s",
                    flush=True,
                )
            await run_load(Workload(duration_s=3, concurrency=4), callers[:1], [gateway_url])
            if args.warm_all:
                started = time.monotonic()
                failed = await touch_all(gateway_url, callers, streams=args.streams)
                print(
                    f"every user asked once in {time.monotonic() - started:.0f} s "
                    f"({failed} failed)",
                    flush=True,
                )
            for phase in args.phases:
                workload = Workload(
                    duration_s=args.seconds,
                    concurrency=args.streams,
                    popularity="zipf" if phase == "zipf" else "uniform",
                    zipf_s=args.zipf_s,
                    max_tokens=args.max_tokens,
                    seed=7,
                )
                who = callers[:1] if phase == "shared" else callers
                loads_before = await adapter_loads(gateway_url)
                rss: list[tuple[float, float]] = []

                async def sample_rss(until: float, rss: list[tuple[float, float]] = rss) -> None:
                    t0 = time.perf_counter()
                    while time.perf_counter() < until:
                        rss.append((time.perf_counter() - t0, gateway_proc.rss_mb()))
                        await asyncio.sleep(2.0)

                until = time.perf_counter() + args.seconds
                load, _ = await asyncio.gather(
                    run_load(workload, who, [gateway_url]), sample_rss(until)
                )
                summary = load.summary()
                phases[phase] = {
                    "load": summary,
                    "adapter_loads": await adapter_loads(gateway_url) - loads_before,
                    "lru_hit_rate": lru_hit_rate(load.records, args.max_cpu_loras),
                    "gateway_rss_mb": rss,
                }
                print(
                    f"{phase}: {summary['tokens_per_s']:.0f} tok/s, {summary['requests']} "
                    f"requests, {summary['errors']} errors, {summary['users_seen']} users",
                    flush=True,
                )
    base = phases["shared"]["load"]["tokens_per_s"]
    for phase in args.phases:
        phases[phase]["ratio_to_shared"] = phases[phase]["load"]["tokens_per_s"] / base
    return {
        "benchmark": "thousand_users",
        "machine": harness.machine(),
        "config": vars(args),
        "preloaded": warmed,
        "phases": phases,
        "targets": {"errors": "0", "ratio_to_shared": ">= 0.8", "gateway_rss": "flat"},
    }


def report(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['config']['users']} users, own adapters (through the gateway)")
    columns = ("phase", "tok/s", "ratio", "requests", "errors", "users", "TTFT p50", "TTFT p95")
    for column in (*columns, "loads", "LRU hits", "gateway RSS MB"):
        table.add_column(column, justify="right")
    for phase, p in result["phases"].items():
        load, rss = p["load"], [m for _, m in p["gateway_rss_mb"]]
        hits = p["lru_hit_rate"]
        table.add_row(
            phase,
            f"{load['tokens_per_s']:.0f}",
            f"{p['ratio_to_shared']:.2f}",
            str(load["requests"]),
            str(load["errors"]),
            str(load["users_seen"]),
            f"{load['ttft_ms']['p50']:.0f} ms",
            f"{load['ttft_ms']['p95']:.0f} ms",
            f"{p['adapter_loads']:.0f}",
            "-" if hits is None else f"{hits:.2f}",
            f"{rss[0]:.0f} -> {rss[-1]:.0f} (max {max(rss):.0f})",
        )
    Console(width=180).print(table)
    warmed = result.get("preloaded") or {}
    if warmed.get("seconds") is not None:
        print(
            f"preloaded by the gateway at start-up: {warmed['adapters']} adapters in "
            f"{warmed['seconds']:.0f} s (before the phases)"
        )


def plot(result: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    phases = result["phases"]
    axes[0].bar(list(phases), [p["load"]["tokens_per_s"] for p in phases.values()])
    axes[0].set_ylabel("completion tokens / s")
    offset = 0.0
    for phase, p in phases.items():
        series = p["gateway_rss_mb"]
        axes[1].plot([offset + t for t, _ in series], [m for _, m in series], label=phase)
        offset += result["config"]["seconds"]
    axes[1].set_xlabel("time (s)")
    axes[1].set_ylabel("gateway RSS (MB)")
    axes[1].legend()
    fig.suptitle(f"{result['config']['users']} users with their own adapters")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=45.0, help="per phase")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--zipf-s", type=float, default=1.1)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-loras", type=int, default=16, help="vLLM slots (gateway default)")
    parser.add_argument("--max-cpu-loras", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--home", type=Path, help="keep (and reuse) the published users here")
    parser.add_argument(
        "--warm-all", action="store_true", help="ask as every user once before the phases"
    )
    parser.add_argument(
        "--preload",
        type=int,
        help="the gateway's adapter_preload (default: --users, every adapter; 0: off)",
    )
    parser.add_argument(
        "--phases", default=",".join(PHASES), help=f"comma-separated, of {', '.join(PHASES)}"
    )
    parser.add_argument("--name", default="thousand_users")
    args = parser.parse_args()
    args.phases = [p for p in args.phases.split(",") if p]
    if "shared" not in args.phases or not set(args.phases) <= set(PHASES):
        parser.error(f"--phases: 'shared' (the baseline) and any of {', '.join(PHASES)}")
    result = asyncio.run(benchmark(args))
    report(result)
    harness.save(args.name, result, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
