"""What the gateway costs: the same streamed load sent straight to vLLM and through the gateway.

One run starts a real vLLM (micro model by default; `--engine-url` for a running one; or the
`--instant-engine` stub, which answers at once, to leave only the gateway's own cost), publishes
one random LoRA per user, starts a real `fedpersona serve` process in front of it, and sends
greedy streamed requests three ways, direct and gateway interleaved (greedy decoding makes both
paths generate the same tokens, so the work is identical):

- saturation: `--concurrency` closed-loop streams for `--seconds` per round: the throughput
  ratio gateway / direct (target >= 0.97). TTFT here is mostly queueing, reported as is;
- below saturation: Poisson arrivals at `--poisson-load` (default 50%) of the direct request
  rate measured at saturation: added TTFT p50/p95 and latency, where queues are short;
- single requests, one at a time, direct and gateway alternating: the median of the paired TTFT
  differences (target <= 2 ms), which load noise does not swamp. With `--floor`, a bare relay
  (`bare_relay.py`: uvicorn and the gateway's engine pool, nothing else) takes turns with them,
  so the added time splits into one more Python HTTP hop on this machine and the gateway's own
  work.

`--engine-cpus 0` keeps the engine on CPU 0 (vLLM's compute threads bound there, every thread
of the engine pinned) and everything else (this client, the gateway, the bare relay) on the
other CPUs, as a GPU engine would leave the gateway's cores alone: on a 2-core machine the
gateway's work otherwise takes CPU from the engine's own compute, and that is not gateway cost.
`--client-cpus 0` then moves this client, once the gateway and the bare relay have started, to
CPU 0 beside the engine, so the gateway has a core of its own, as it would beside a GPU engine
with the clients on other machines (the client waits on both paths alike).

Prints a table and writes `benchmarks/results/serve_overhead[_instant].json` and `.png`.

    python benchmarks/serve_overhead.py                       # micro model, own vLLM
    python benchmarks/serve_overhead.py --instant-engine      # the gateway's own cost
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import subprocess
from contextlib import contextmanager

import harness
from fedpersona.adapters.manifest import model_name
from fedpersona.service.load.client import (
    Caller,
    Workload,
    chat_body,
    percentile,
    run_load,
    send,
)


@asynccontextmanager
async def engine(args: argparse.Namespace, home: Path, model_dir: Path) -> Any:
    """(url, key for direct requests, model name) of the engine to measure against."""
    if args.instant_engine:
        with harness.stub_engine("stub-base", tokens=args.max_tokens) as (url, proc):
            harness.place_engine(proc.popen.pid, harness.split_cpus(args.engine_cpus))
            yield url, None, "stub-base"
    elif args.engine_url:
        yield args.engine_url.rstrip("/"), args.engine_key, model_name(model_dir)
    else:
        async with harness.vllm(
            model_dir,
            home,
            max_loras=args.max_loras,
            max_cpu_loras=max(args.users, args.max_loras),
            max_model_len=args.max_model_len,
        ) as (url, supervisor):
            harness.place_engine(supervisor.pid, harness.split_cpus(args.engine_cpus))
            yield url, harness.ENGINE_KEY, model_name(model_dir)


@contextmanager
def bare_relay(engine_url: str, engine_key: str | None) -> Any:
    """`bare_relay.py` in front of the engine: the floor of one more Python hop."""
    port = harness.free_port()
    command = [sys.executable, str(Path(__file__).with_name("bare_relay.py"))]
    command += ["--engine-url", engine_url, "--port", str(port)]
    if engine_key:
        command += ["--engine-key", engine_key]
    popen = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = harness.Proc(popen, "bare relay")
    try:
        url = f"http://127.0.0.1:{port}"
        harness.wait_healthy(url, proc, timeout=60)
        yield url
    finally:
        proc.stop()


async def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    harness.bind_engine_threads(harness.split_cpus(args.engine_cpus))
    home = harness.temp_home("overhead")
    model_dir = harness.micro_model_dir() if args.model_dir is None else args.model_dir
    async with AsyncExitStack() as stack:
        engine_url, engine_key, model = await stack.enter_async_context(
            engine(args, home, model_dir)
        )
        users = [f"user{i}" for i in range(args.users)]
        published = harness.publish_users(home, users, model_dir=model_dir, model=model)
        gateway_url, gateway_proc = stack.enter_context(
            harness.gateway(
                home,
                model=model,
                engine_url=engine_url,
                engine_key=engine_key,
                max_model_len=args.max_model_len,
                nice=args.gateway_nice,
            )
        )
        via_gateway = published.callers()
        direct = [Caller(u, engine_key, f"u-{u}-{published.versions[u].id}") for u in users]
        paths = {"direct": (engine_url, direct), "gateway": (gateway_url, via_gateway)}
        floor_url = stack.enter_context(bare_relay(engine_url, engine_key)) if args.floor else None
        if args.client_cpus:  # the gateway and the relay keep the CPUs they started on
            os.sched_setaffinity(0, {int(c) for c in args.client_cpus.split(",")})
            print(f"load client on CPUs {sorted(os.sched_getaffinity(0))}")
        # Warm up: the gateway loads every adapter; both paths open their connections.
        for name in ("gateway", "direct"):
            url, callers = paths[name]
            await run_load(Workload(duration_s=3, concurrency=len(users)), callers, [url])

        saturation: dict[str, list[dict[str, Any]]] = {"direct": [], "gateway": []}
        closed = Workload(
            duration_s=args.seconds, concurrency=args.concurrency, max_tokens=args.max_tokens
        )
        for r in range(args.rounds):
            print(f"saturation round {r + 1}/{args.rounds} ...", flush=True)
            for name, (url, callers) in paths.items():
                cpu = gateway_proc.cpu_s(), harness.this_process_cpu_s()
                summary = (await run_load(closed, callers, [url])).summary()
                # CPU share of one core the gateway and the load client used in the round.
                summary["gateway_cpu_share"] = (gateway_proc.cpu_s() - cpu[0]) / summary["wall_s"]
                summary["client_cpu_share"] = (harness.this_process_cpu_s() - cpu[1]) / summary[
                    "wall_s"
                ]
                saturation[name].append(summary)
        direct_rps = statistics.median(x["requests_per_s"] for x in saturation["direct"])
        rate = args.poisson_load * direct_rps
        poisson: dict[str, list[dict[str, Any]]] = {"direct": [], "gateway": []}
        for r in range(args.poisson_rounds):
            print(
                f"Poisson round {r + 1}/{args.poisson_rounds} at {rate:.1f} req/s ...", flush=True
            )
            for name, (url, callers) in paths.items():
                open_loop = Workload(
                    duration_s=args.poisson_seconds,
                    rate_rps=rate,
                    max_tokens=args.max_tokens,
                    seed=r,
                )
                poisson[name].append((await run_load(open_loop, callers, [url])).summary())
        print(f"paired single requests x {args.paired} ...", flush=True)
        diffs: list[float] = []
        floor_diffs: list[float] = []
        single = dict(paths)
        if floor_url is not None:
            single["floor"] = (floor_url, direct)  # engine names, passed through untouched
        names = list(single)
        body_of = Workload(duration_s=1, max_tokens=args.max_tokens)
        async with httpx.AsyncClient(timeout=120) as client:
            for i in range(args.paired):
                order = names[i % len(names) :] + names[: i % len(names)]  # rotate who goes first
                ttft = {}
                for name in order:
                    url, callers = single[name]
                    caller = callers[i % len(callers)]
                    record = await send(client, url, caller, chat_body(body_of, caller, i))
                    if record.ok and record.ttft_s is not None:
                        ttft[name] = record.ttft_s
                if len(ttft) == len(names):
                    diffs.append((ttft["gateway"] - ttft["direct"]) * 1000)
                    if "floor" in ttft:
                        floor_diffs.append((ttft["floor"] - ttft["direct"]) * 1000)

    def med(table: dict[str, list[dict[str, Any]]], path: str, *keys: str) -> float:
        return harness.median_at(table[path], *keys)

    return {
        "benchmark": "serve_overhead",
        "machine": harness.machine(),
        "engine": "instant stub (gateway cost only)"
        if args.instant_engine
        else "external vLLM"
        if args.engine_url
        else "vLLM (CPU build)",
        "model": str(model_dir),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "saturation": saturation,
        "throughput_ratio": med(saturation, "gateway", "tokens_per_s")
        / med(saturation, "direct", "tokens_per_s"),
        "saturation_added_ttft_p50_ms": med(saturation, "gateway", "ttft_ms", "p50")
        - med(saturation, "direct", "ttft_ms", "p50"),
        "poisson": {
            "rate_rps": rate,
            "load_of_capacity": args.poisson_load,
            "rounds": poisson,
            "added_ttft_p50_ms": med(poisson, "gateway", "ttft_ms", "p50")
            - med(poisson, "direct", "ttft_ms", "p50"),
            "added_ttft_p95_ms": med(poisson, "gateway", "ttft_ms", "p95")
            - med(poisson, "direct", "ttft_ms", "p95"),
            "added_latency_p50_ms": med(poisson, "gateway", "latency_ms", "p50")
            - med(poisson, "direct", "latency_ms", "p50"),
        },
        "paired_added_ttft_ms": {
            "n": len(diffs),
            "median": statistics.median(diffs) if diffs else None,
            "p90": percentile(diffs, 0.9),
        },
        # The bare relay's added TTFT in the same rounds (None without --floor).
        "floor_added_ttft_ms": {
            "n": len(floor_diffs),
            "median": statistics.median(floor_diffs) if floor_diffs else None,
            "p90": percentile(floor_diffs, 0.9) if floor_diffs else None,
        },
        "errors": sum(x["errors"] for t in (saturation, poisson) for v in t.values() for x in v),
        "targets": {
            "throughput_ratio": ">= 0.97 at saturation",
            "paired_added_ttft_ms": "median <= 2",
        },
    }


def report(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"gateway overhead ({result['engine']}; medians over rounds)")
    for column in ("load", "path", "tok/s", "req/s", "TTFT p50", "TTFT p95", "lat p50", "errors"):
        table.add_column(column, justify="right")
    for load, rows in (("saturation", result["saturation"]), ("Poisson", result["poisson"])):
        rows = rows.get("rounds", rows)
        for path, runs in rows.items():

            def m(*keys: str, runs: list[dict[str, Any]] = runs) -> float:
                return harness.median_at(runs, *keys)

            table.add_row(
                load,
                path,
                f"{m('tokens_per_s'):.0f}",
                f"{m('requests_per_s'):.1f}",
                f"{m('ttft_ms', 'p50'):.1f}",
                f"{m('ttft_ms', 'p95'):.1f}",
                f"{m('latency_ms', 'p50'):.1f}",
                str(sum(r["errors"] for r in runs)),
            )
    console = Console()
    console.print(table)
    p, paired = result["poisson"], result["paired_added_ttft_ms"]
    console.print(
        f"saturation: throughput gateway/direct {result['throughput_ratio']:.3f} (target >= "
        f"0.97); added TTFT p50 {result['saturation_added_ttft_p50_ms']:.1f} ms (queueing)"
    )
    console.print(
        f"Poisson at {p['load_of_capacity']:.0%} of capacity ({p['rate_rps']:.1f} req/s): added "
        f"TTFT p50 {p['added_ttft_p50_ms']:.2f} ms, p95 {p['added_ttft_p95_ms']:.2f} ms, "
        f"latency p50 {p['added_latency_p50_ms']:.2f} ms"
    )
    if paired["median"] is not None:
        console.print(
            f"single requests ({paired['n']} pairs): added TTFT median {paired['median']:.2f} ms "
            f"(target <= 2), p90 {paired['p90']:.2f} ms"
        )
    floor = result.get("floor_added_ttft_ms") or {}
    if floor.get("median") is not None:
        console.print(
            f"bare relay (one more Python hop, nothing else) in the same rounds: added TTFT "
            f"median {floor['median']:.2f} ms, p90 {floor['p90']:.2f} ms"
        )


def plot(result: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, (title, rows, key) in zip(
        axes,
        (
            ("saturation tok/s", result["saturation"], ("tokens_per_s",)),
            ("Poisson TTFT p50 (ms)", result["poisson"]["rounds"], ("ttft_ms", "p50")),
            ("Poisson TTFT p95 (ms)", result["poisson"]["rounds"], ("ttft_ms", "p95")),
        ),
        strict=True,
    ):
        for i, name in enumerate(("direct", "gateway")):
            values = []
            for run in rows[name]:
                value: Any = run
                for k in key:
                    value = value[k]
                values.append(value)
            ax.scatter([i] * len(values), values, label=name)
        ax.set_xticks([0, 1], ["direct", "gateway"])
        ax.set_title(title)
    fig.suptitle(
        f"{result['engine']}: throughput ratio {result['throughput_ratio']:.3f}, paired added "
        f"TTFT {result['paired_added_ttft_ms']['median'] or float('nan'):.2f} ms"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="model dir (default: the micro model)")
    parser.add_argument("--engine-url", help="use a running vLLM instead of starting one")
    parser.add_argument("--engine-key", help="that vLLM's API key")
    parser.add_argument(
        "--instant-engine", action="store_true", help="a stub that answers at once (gateway cost)"
    )
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=15.0, help="per saturation round")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--poisson-load", type=float, default=0.5, help="share of capacity")
    parser.add_argument("--poisson-seconds", type=float, default=20.0)
    parser.add_argument("--poisson-rounds", type=int, default=2)
    parser.add_argument("--paired", type=int, default=32, help="single requests per path")
    parser.add_argument(
        "--gateway-nice", type=int, default=0, help="niceness of the gateway process"
    )
    parser.add_argument("--max-loras", type=int, default=4)
    parser.add_argument(
        "--floor", action="store_true", help="add a bare relay to the single requests"
    )
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument(
        "--engine-cpus", help="CPUs for the engine alone, e.g. 0 (the rest run everything else)"
    )
    parser.add_argument(
        "--client-cpus",
        help="CPUs for this load client once the gateway has started, e.g. 0 (with --engine-cpus 0:"
        " the gateway alone on the other core)",
    )
    parser.add_argument("--name", help="result name (default serve_overhead[_instant])")
    args = parser.parse_args()
    name = args.name or ("serve_overhead_instant" if args.instant_engine else "serve_overhead")
    result = asyncio.run(benchmark(args))
    report(result)
    harness.save(name, result, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
