"""The same Zipf load over two vLLM replicas and over one, then one replica killed mid-run.

Two real vLLMs (micro model, CPU build) and real `fedpersona serve` processes configured with
`replicas=[...]` (adapter-affinity routing, as the chart runs them). Phases, each `--seconds`
of closed-loop Zipf load from `--users` users with their own adapters:

- `one replica`: a gateway over replica A alone;
- `two replicas`: a gateway over A and B;
- `kill`: the two-replica gateway again, and B is stopped halfway through.

Reports tokens per second (two / one: on this CPU-only machine both replicas share the same
cores, so the ratio says what routing costs, not what a second GPU adds), the adapter names each
replica holds (affinity: an adapter on as few replicas as its traffic needs), and for the kill:
failed requests split into those that started after the kill (target 0: the other replica
could serve them) and those streaming on B at the moment it died (cannot be moved mid-stream).

    python benchmarks/two_replicas.py                     # 64 users, 3 x 30 s
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness
from fedpersona.adapters.manifest import model_name
from fedpersona.service.load.client import Workload, run_load


async def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    model_dir = harness.micro_model_dir()
    model = model_name(model_dir)
    home = harness.temp_home("replicas")
    users = [f"user{i:03d}" for i in range(args.users)]
    published = harness.publish_users(home, users, model_dir=model_dir, model=model)
    callers = published.callers()
    engine = {
        "max_loras": args.max_loras,
        "max_cpu_loras": args.max_cpu_loras,
        "max_model_len": args.max_model_len,
    }
    workload = Workload(
        duration_s=args.seconds,
        concurrency=args.streams,
        popularity="zipf",
        max_tokens=args.max_tokens,
        seed=11,
    )
    phases: dict[str, Any] = {}
    async with (
        harness.vllm(model_dir, home, name="replica-a", **engine) as (url_a, _),
        harness.vllm(model_dir, home, name="replica-b", **engine) as (url_b, sup_b),
    ):
        common = {"model": model, "engine_key": harness.ENGINE_KEY}
        env = {"FEDPERSONA_REPLICAS_REFRESH_S": "0.5"}
        with harness.gateway(home, replicas=[url_a], env=env, **common) as (gw_one, _):
            await run_load(Workload(duration_s=3, concurrency=4), callers, [gw_one])
            result = await run_load(workload, callers, [gw_one])
            phases["one replica"] = {"load": result.summary()}
        with harness.gateway(home, replicas=[url_a, url_b], env=env, **common) as (gw_two, _):
            await run_load(Workload(duration_s=3, concurrency=4), callers, [gw_two])
            result = await run_load(workload, callers, [gw_two])
            phases["two replicas"] = {
                "load": result.summary(),
                "adapters_on": {
                    "a": len(await harness.registered(url_a)) - 1,
                    "b": len(await harness.registered(url_b)) - 1,
                },
            }
            killed_at: list[float] = []

            async def kill() -> None:
                await asyncio.sleep(args.seconds / 2)
                killed_at.append(time.perf_counter())
                await sup_b.stop(1.0)

            result, _ = await asyncio.gather(run_load(workload, callers, [gw_two]), kill())
            at = killed_at[0]
            failed = [r for r in result.records if not r.ok]
            phases["kill"] = {
                "load": result.summary(),
                "failed_started_after_kill": sum(r.started >= at for r in failed),
                "failed_in_flight_at_kill": sum(r.started < at for r in failed),
                "ok_after_kill": sum(r.ok and r.started >= at for r in result.records),
                "errors": sorted({r.error or "" for r in failed})[:5],
            }
    one = phases["one replica"]["load"]["tokens_per_s"]
    return {
        "benchmark": "two_replicas",
        "machine": harness.machine(),
        "config": vars(args),
        "phases": phases,
        "two_over_one": phases["two replicas"]["load"]["tokens_per_s"] / one,
        "targets": {"failed_started_after_kill": "0", "ratio": "reported (CPU-bound here)"},
    }


def report(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Zipf load, {result['config']['users']} users: 1 vs 2 vLLM replicas")
    for column in ("phase", "tok/s", "requests", "errors", "TTFT p50", "TTFT p95", "notes"):
        table.add_column(column, justify="right")
    for phase, p in result["phases"].items():
        load = p["load"]
        notes = ""
        if "adapters_on" in p:
            notes = "adapters on A/B: {a}/{b}".format(**p["adapters_on"])
        if phase == "kill":
            notes = (
                f"failed after kill {p['failed_started_after_kill']}, in flight at kill "
                f"{p['failed_in_flight_at_kill']}, ok after kill {p['ok_after_kill']}"
            )
        table.add_row(
            phase,
            f"{load['tokens_per_s']:.0f}",
            str(load["requests"]),
            str(load["errors"]),
            f"{load['ttft_ms']['p50']:.0f} ms",
            f"{load['ttft_ms']['p95']:.0f} ms",
            notes,
        )
    Console(width=180).print(table)
    Console().print(f"two replicas / one: {result['two_over_one']:.2f}")


def plot(result: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()

    phases = result["phases"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(list(phases), [p["load"]["tokens_per_s"] for p in phases.values()])
    ax.set_ylabel("completion tokens / s")
    ax.set_title(f"two / one replica: {result['two_over_one']:.2f} (CPU-only machine)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=30.0, help="per phase")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-loras", type=int, default=4)
    parser.add_argument("--max-cpu-loras", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--name", default="two_replicas")
    args = parser.parse_args()
    result = asyncio.run(benchmark(args))
    report(result)
    harness.save(args.name, result, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
