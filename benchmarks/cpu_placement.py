"""The embedded CPU engine with and without `FEDPERSONA_ENGINE__CPU_CORES`: same load, turns.

`fedpersona serve` with its own vLLM (micro model, CPU build), started fresh for every run, once
with vLLM's own CPU binding and every process free to run anywhere ("free") and once with
`FEDPERSONA_ENGINE__CPU_CORES=<first CPU>` ("placed": vLLM's model compute bound there, the
gateway moved to the other CPUs; `fedpersona.service.engine.placement`), alternating for
`--rounds` rounds. The load: `--users` users with their own adapters, one stream each for
`--seconds`, `--max-tokens` per answer, from this process kept off vLLM's cores in both modes
once the gateway has started (clients are elsewhere in a deployment; left free, the client
itself would take time from vLLM's compute). Reports tokens per second, TTFT p50/p95 and errors
per run, and placed / free medians. Needs two CPUs or more.

    python benchmarks/cpu_placement.py                 # 8 users, 2 rounds x 20 s
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness
from fedpersona.adapters.manifest import model_name
from fedpersona.service.engine import placement
from fedpersona.service.load.client import Workload, run_load


async def one_run(
    args: argparse.Namespace,
    home: Path,
    model_dir: Path,
    callers: list[Any],
    cores: str | None,
    client_cpus: set[int],
) -> dict[str, Any]:
    env = {
        "FEDPERSONA_ENGINE__MODEL_DIR": str(model_dir),
        "FEDPERSONA_ENGINE__PORT": str(harness.free_port()),
        "FEDPERSONA_ENGINE__MAX_LORAS": str(args.users),
        "FEDPERSONA_ENGINE__MAX_CPU_LORAS": str(2 * args.users),
        "FEDPERSONA_ENGINE__KV_CACHE_GIB": "1",
        **({"FEDPERSONA_ENGINE__CPU_CORES": cores} if cores else {}),
    }
    with harness.gateway(
        home, model=model_name(model_dir), max_model_len=args.max_model_len, env=env
    ) as (url, proc):
        ready_s = harness.wait_ready(url, proc)
        mine = os.sched_getaffinity(0)
        os.sched_setaffinity(0, client_cpus)
        try:
            warm = Workload(duration_s=3, stream_per_caller=True, max_tokens=4)
            await run_load(warm, callers, [url])
            load = Workload(
                duration_s=args.seconds, stream_per_caller=True, max_tokens=args.max_tokens
            )
            summary = (await run_load(load, callers, [url])).summary()
        finally:
            os.sched_setaffinity(0, mine)  # the next gateway starts free
    return {"cpu_cores": cores, "ready_s": ready_s, "load": summary}


async def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("needs two CPUs or more")
    cores = str(cpus[0]) if args.cpu_cores is None else args.cpu_cores
    model_dir = harness.micro_model_dir()
    home = harness.temp_home("placement")
    users = [f"user{i}" for i in range(args.users)]
    published = harness.publish_users(home, users, model_dir=model_dir, model=model_name(model_dir))
    runs: dict[str, list[dict[str, Any]]] = {"free": [], "placed": []}
    for r in range(args.rounds):
        order = ["free", "placed"] if r % 2 == 0 else ["placed", "free"]
        for mode in order:
            print(f"round {r + 1}/{args.rounds}: {mode} ...", flush=True)
            run = await one_run(
                args,
                home,
                model_dir,
                published.callers(),
                cores if mode == "placed" else None,
                client_cpus=set(cpus) - placement.parse_cpu_list(cores),
            )
            runs[mode].append(run)

    def med(mode: str, *keys: str) -> float:
        return harness.median_at(runs[mode], "load", *keys)

    return {
        "benchmark": "cpu_placement",
        "machine": harness.machine(),
        "config": vars(args) | {"cpu_cores": cores},
        "runs": runs,
        "placed_over_free": {
            "tokens_per_s": med("placed", "tokens_per_s") / med("free", "tokens_per_s"),
            "ttft_p50": med("placed", "ttft_ms", "p50") / med("free", "ttft_ms", "p50"),
            "ttft_p95": med("placed", "ttft_ms", "p95") / med("free", "ttft_ms", "p95"),
        },
        "errors": sum(run["load"]["errors"] for mode in runs.values() for run in mode),
    }


def report(result: dict[str, Any]) -> None:
    print(f"{'run':>10} {'tok/s':>8} {'requests':>9} {'TTFT p50':>9} {'TTFT p95':>9} {'errors':>7}")
    for mode, runs in result["runs"].items():
        for run in runs:
            load = run["load"]
            print(
                f"{mode:>10} {load['tokens_per_s']:8.0f} {load['requests']:9d} "
                f"{load['ttft_ms']['p50']:8.0f}ms {load['ttft_ms']['p95']:8.0f}ms "
                f"{load['errors']:7d}"
            )
    ratio = result["placed_over_free"]
    print(
        f"placed / free (medians): tok/s {ratio['tokens_per_s']:.2f}, TTFT p50 "
        f"{ratio['ttft_p50']:.2f}, p95 {ratio['ttft_p95']:.2f}; errors {result['errors']}"
    )


def plot(result: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    for i, runs in enumerate(result["runs"].values()):
        axes[0].scatter([i] * len(runs), [r["load"]["tokens_per_s"] for r in runs])
        axes[1].scatter([i] * len(runs), [r["load"]["ttft_ms"]["p50"] for r in runs])
    for ax, title in zip(axes, ("tokens / s", "TTFT p50 (ms)"), strict=True):
        ax.set_xticks([0, 1], list(result["runs"]))
        ax.set_title(title)
    fig.suptitle(f"embedded CPU engine, compute on CPUs {result['config']['cpu_cores']} or free")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0, help="per run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--cpu-cores", help="vLLM's compute CPUs when placed (default: the first)")
    parser.add_argument("--name", default="cpu_placement")
    args = parser.parse_args()
    result = asyncio.run(benchmark(args))
    report(result)
    harness.save(args.name, result, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
