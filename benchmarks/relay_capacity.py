"""The gateway's own relay capacity: streamed load on an engine that answers at once.

A stub engine (`fedpersona.service.load.stub_engine`, its own process) streams `--max-tokens`
tokens per request with no engine time. The same closed-loop load (`--streams` concurrent
streams, `--seconds` per round) goes straight to it, through one `fedpersona serve` process,
and through two (requests alternate between them), rounds interleaved. Reports per setup:
completion tokens per second, the ratio to direct, TTFT p50/p95, and the CPU milliseconds each
process spent per 1,000 relayed tokens (gateway, stub engine, and this load client), measured
with psutil over the round. Targets: ratio >= 0.8 at 16 and 64 streams for one gateway process;
throughput that grows with gateway processes. Each round also records CPU ms per request and the
machine's load average.

The gateway relays what one engine read brought in one write, so under load its client gets
several events per network read where the stub sends one per event: through the gateway the load
client spends less CPU per token than direct, and on a machine whose cores are the bound the
ratio can exceed 1. It then says the machine is the bound; the gateway's CPU per 1,000 tokens
says what the relay costs.

All processes share this machine's cores: where client + engine + gateway need more CPU than
there is, the ratio is bounded by the machine, not only by the gateway; the CPU per 1,000
tokens is the number that carries to another machine (1e6 / it = tokens per second one fully
used core relays).

    python benchmarks/relay_capacity.py                 # 16 and 64 streams, 1 and 2 gateways
    python benchmarks/relay_capacity.py --profile       # + cProfile of one gateway (top 25)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pstats
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness
from fedpersona.service.load.client import Caller, Workload, run_load

MODEL = "stub-base"
SETUPS = ("direct", "gateway x1", "gateway x2")


async def measure(
    targets: list[str], callers: list[Caller], procs: list[harness.Proc], *, streams: int, args: Any
) -> dict[str, Any]:
    workload = Workload(
        duration_s=args.seconds, concurrency=streams, max_tokens=args.max_tokens, seed=streams
    )
    before = [p.cpu_s() for p in procs]
    client_before = harness.this_process_cpu_s()
    result = await run_load(workload, callers, targets)
    summary = result.summary()
    tokens = max(summary["tokens"], 1)
    requests = max(summary["requests"], 1)
    cpu: dict[str, float] = {}
    for p, b in zip(procs, before, strict=True):
        kind = "gateways" if p.name.startswith("gateway") else p.name
        cpu[kind] = cpu.get(kind, 0.0) + p.cpu_s() - b
    cpu["client"] = harness.this_process_cpu_s() - client_before
    return {
        "tokens_per_s": summary["tokens_per_s"],
        "requests": summary["requests"],
        "errors": summary["errors"],
        "ttft_p50_ms": summary["ttft_ms"]["p50"],
        "ttft_p95_ms": summary["ttft_ms"]["p95"],
        "cpu_ms_per_1k_tokens": {k: v * 1e6 / tokens for k, v in cpu.items()},
        "cpu_ms_per_request": {k: v * 1e3 / requests for k, v in cpu.items()},
        # The machine's 1-minute load average after the round: other jobs share these cores.
        "load_avg_1m": os.getloadavg()[0],
    }


async def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    home = harness.temp_home("relay")
    users = [f"user{i}" for i in range(args.users)]
    # The stub ignores adapter contents; any valid LoRA for a tiny Llama shape will do.
    published = harness.publish_users(home, users, model_dir=harness.micro_model_dir(), model=MODEL)
    callers = published.callers()
    direct_callers = [Caller(u, None, f"u-{u}-{published.versions[u].id}") for u in users]
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with harness.stub_engine(MODEL, tokens=args.max_tokens) as (engine_url, engine):
        profile = home / "gateway.prof" if args.profile else None
        with (
            harness.gateway(home, model=MODEL, engine_url=engine_url, profile=profile) as (g1, p1),
            harness.gateway(home, model=MODEL, engine_url=engine_url) as (g2, p2),
        ):
            # Direct requests need the adapters registered: one warm-up through each gateway.
            for url in (g1, g2):
                await run_load(Workload(duration_s=1, concurrency=4), callers, [url])
            setups = {
                "direct": ([engine_url], direct_callers, [engine]),
                "gateway x1": ([g1], callers, [engine, p1]),
                "gateway x2": ([g1, g2], callers, [engine, p1, p2]),
            }
            for streams in args.streams:
                rows[str(streams)] = {name: [] for name in SETUPS}
                for r in range(args.rounds):
                    for name in SETUPS:
                        targets, who, procs = setups[name]
                        row = await measure(targets, who, procs, streams=streams, args=args)
                        rows[str(streams)][name].append(row)
                        print(
                            f"{streams} streams, round {r + 1}, {name}: "
                            f"{row['tokens_per_s']:.0f} tok/s, {row['errors']} errors",
                            flush=True,
                        )
    result: dict[str, Any] = {
        "benchmark": "relay_capacity",
        "machine": harness.machine(),
        "config": {k: v for k, v in vars(args).items()},
        "rounds": rows,
        "summary": summarize(rows),
        "targets": {"ratio_one_gateway": ">= 0.8 at 16 and 64 streams", "scaling": "x2 > x1"},
    }
    if profile is not None and profile.exists():
        stats = pstats.Stats(str(profile))
        stats.sort_stats("cumulative")
        result["profile_file"] = str(profile)
        stats.print_stats(25)
        stats.sort_stats("tottime").print_stats(25)
    return result


def summarize(rows: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for streams, by_setup in rows.items():
        direct = statistics.median(r["tokens_per_s"] for r in by_setup["direct"])
        out[streams] = {}
        for name, runs in by_setup.items():
            tps = statistics.median(r["tokens_per_s"] for r in runs)
            cpu_keys = runs[0]["cpu_ms_per_1k_tokens"].keys()
            paired = [
                r["tokens_per_s"] / d["tokens_per_s"]
                for r, d in zip(runs, by_setup["direct"], strict=True)
                if d["tokens_per_s"] > 0
            ]
            out[streams][name] = {
                "tokens_per_s": tps,
                "ratio_to_direct": tps / direct,
                # Each round against the direct round just before it: the load of other jobs on
                # this machine drifts between rounds, less within one.
                "ratio_paired_rounds": statistics.median(paired) if paired else None,
                "ttft_p50_ms": statistics.median(r["ttft_p50_ms"] for r in runs),
                "ttft_p95_ms": statistics.median(r["ttft_p95_ms"] for r in runs),
                "errors": sum(r["errors"] for r in runs),
                "cpu_ms_per_1k_tokens": {
                    k: statistics.median(r["cpu_ms_per_1k_tokens"][k] for r in runs)
                    for k in cpu_keys
                },
                "cpu_ms_per_request": {
                    k: statistics.median(r["cpu_ms_per_request"][k] for r in runs) for k in cpu_keys
                },
                "load_avg_1m": [r.get("load_avg_1m") for r in runs],
            }
    return out


def report(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="gateway relay capacity (stub engine; medians over rounds)")
    for column in ("streams", "setup", "tok/s", "ratio", "TTFT p50", "TTFT p95", "errors"):
        table.add_column(column, justify="right")
    table.add_column("CPU ms / 1k tokens", justify="left")
    table.add_column("gateway CPU ms / request", justify="right")
    for streams, by_setup in result["summary"].items():
        for name, s in by_setup.items():
            cpu = ", ".join(f"{k} {v:.0f}" for k, v in s["cpu_ms_per_1k_tokens"].items())
            table.add_row(
                streams,
                name,
                f"{s['tokens_per_s']:.0f}",
                f"{s['ratio_to_direct']:.2f}",
                f"{s['ttft_p50_ms']:.1f}",
                f"{s['ttft_p95_ms']:.1f}",
                str(s["errors"]),
                cpu,
                f"{s['cpu_ms_per_request'].get('gateways', float('nan')):.2f}",
            )
    Console(width=180).print(table)


def plot(result: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()

    summary = result["summary"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.25
    for i, name in enumerate(SETUPS):
        xs = [j + (i - 1) * width for j in range(len(summary))]
        ax.bar(xs, [summary[s][name]["tokens_per_s"] for s in summary], width, label=name)
    ax.set_xticks(range(len(summary)), [f"{s} streams" for s in summary])
    ax.set_ylabel("completion tokens / s")
    ax.legend()
    ax.set_title(f"relay capacity, {result['machine']['cpus']} CPUs (stub engine)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--seconds", type=float, default=6.0, help="per round and setup")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--profile", action="store_true", help="cProfile the first gateway")
    parser.add_argument("--name", default="relay_capacity", help="result file name")
    args = parser.parse_args()
    result = asyncio.run(benchmark(args))
    report(result)
    harness.save(args.name, result, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
