"""Hot swaps under load: users stream without pause while new versions of their adapters land.

A real vLLM (micro model, CPU build) behind a real `fedpersona serve` process (shared-engine
mode: vLLM's LRU bounds adapter memory; the gateway unloads only superseded versions, after
`adapter_unload_grace_s`). `--users` users each keep one stream going for `--seconds`; meanwhile
every user's served slot gets `--versions` new versions (evenly spaced, users staggered),
published into the store the gateway reads, as a training round does.

Measured: failed requests (target 0); for every publish, the time until the first token of the
first answer from the new version (the `x-fedpersona-adapter` header names it), p50/p95/max
(target p95 <= 1 s); answers from an older version after the new one answered (should be 0);
and the adapter names vLLM holds (`/v1/models`, sampled every second; target: bounded).

The gateway preloads (`adapter_preload`, default: vLLM's `--max-cpu-loras`): it loads a user's
new version as soon as the store shows it, so the user's next request does not pay the load;
`--preload 0` turns that off (every new version loaded by its first request, as before).
It notices a publish through the store's publish stamp (every 0.02 s); `--publish-watch 0`
leaves only the per-slot poll (every 0.2 s), for an A/B of the two. `--engine-cpus 0` keeps
vLLM on CPU 0 and the gateway and this client on the others, as beside a GPU engine: vLLM's CPU
build binds its model compute to cores of its own (on 2 cores: CPU 0, CPU 1 left to its front
end), but nothing keeps the gateway and the client off that core, and every time slice they take
there stretches a model step, and with it every time to first token.

    python benchmarks/hot_swap.py                          # 8 users, 60 s, 20 versions each
    python benchmarks/hot_swap.py --seconds 20 --versions 5
    python benchmarks/hot_swap.py --preload 0 --name hot_swap_no_preload
    python benchmarks/hot_swap.py --publish-watch 0 --name hot_swap_poll_only
    python benchmarks/hot_swap.py --engine-cpus 0 --name hot_swap_own_core
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness
from fedpersona.adapters import Slot
from fedpersona.adapters.manifest import model_name
from fedpersona.service.load.client import Record, Workload, percentile, run_load


async def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    model_dir = harness.micro_model_dir()
    model = model_name(model_dir)
    home = harness.temp_home("hotswap")
    users = [f"user{i}" for i in range(args.users)]
    published = harness.publish_users(home, users, model_dir=model_dir, model=model)
    publishes: list[dict[str, Any]] = []
    registered: list[tuple[float, int]] = []
    max_cpu_loras = 2 * args.users
    env = {"FEDPERSONA_ENGINE__MAX_CPU_LORAS": str(max_cpu_loras)}  # what the engine runs with
    if args.preload is not None:
        env["FEDPERSONA_ADAPTER_PRELOAD"] = str(args.preload)
    if args.publish_watch is not None:
        env["FEDPERSONA_ADAPTER_PUBLISH_WATCH_S"] = str(args.publish_watch)
    cpus = harness.split_cpus(args.engine_cpus)
    harness.bind_engine_threads(cpus)
    async with harness.vllm(
        model_dir,
        home,
        max_loras=args.users,
        max_cpu_loras=max_cpu_loras,
        max_model_len=args.max_model_len,
    ) as (engine_url, supervisor):
        harness.place_engine(supervisor.pid, cpus)
        with harness.gateway(
            home,
            model=model,
            engine_url=engine_url,
            engine_key=harness.ENGINE_KEY,
            max_model_len=args.max_model_len,
            env=env,
        ) as (gateway_url, gateway_proc):
            callers = published.callers()
            warm = Workload(duration_s=3, stream_per_caller=True, max_tokens=4)
            await run_load(warm, callers, [gateway_url])
            workload = Workload(
                duration_s=args.seconds, stream_per_caller=True, max_tokens=args.max_tokens
            )
            started = time.perf_counter()

            async def publisher() -> None:
                gap = args.seconds * 0.9 / args.versions
                for k in range(args.versions):
                    for i, user in enumerate(users):
                        at = started + gap * (k + 0.5) + gap * i / len(users)
                        await asyncio.sleep(max(0.0, at - time.perf_counter()))
                        lora = harness.random_lora(model_dir, model, seed=10_000 + 100 * k + i)
                        version = await asyncio.to_thread(
                            published.store.publish_lora, Slot.user_served(user), lora
                        )
                        publishes.append(
                            {"user": user, "version": version.id, "at": time.perf_counter()}
                        )

            async def sampler() -> None:
                while time.perf_counter() < started + args.seconds + 2:
                    names = await harness.registered(engine_url)
                    registered.append((time.perf_counter() - started, len(names) - 1))
                    await asyncio.sleep(1.0)

            rss_before = gateway_proc.rss_mb()
            names = ("fedpersona_adapter_loads", "fedpersona_adapter_preloads")
            before = [await harness.counter(gateway_url, n) for n in names]
            load, _, _ = await asyncio.gather(
                run_load(workload, callers, [gateway_url]), publisher(), sampler()
            )
            after = [await harness.counter(gateway_url, n) for n in names]
            rss_after = gateway_proc.rss_mb()
    loads, preloads = (a - b for a, b in zip(after, before, strict=True))
    return analyse(args, load.records, load.summary(), publishes, registered, started) | {
        "gateway_rss_mb": {"before": rss_before, "after": rss_after},
        # Loads during the run: those the preloader made, and the rest, each paid by a request.
        "adapter_loads": {"all": loads, "preloaded": preloads, "by_requests": loads - preloads},
    }


def analyse(
    args: argparse.Namespace,
    records: list[Record],
    summary: dict[str, Any],
    publishes: list[dict[str, Any]],
    registered: list[tuple[float, int]],
    started: float,
) -> dict[str, Any]:
    by_user: dict[str, list[Record]] = {}
    for record in sorted(records, key=lambda r: r.started):
        if record.ok:
            by_user.setdefault(record.user, []).append(record)
    swaps, waits, firsts, missed = [], [], [], 0
    for publish in publishes:
        tag = f"users/{publish['user']}/served@{publish['version']}"
        served = [r for r in by_user.get(publish["user"], []) if r.adapter == tag]
        if served:
            first = min(served, key=lambda r: r.started)
            swaps.append(
                max(0.0, first.started + (first.ttft_s or first.latency_s) - publish["at"])
            )
            # The two parts: waiting for the user's next request (the one in flight at the
            # publish finishes on the old version), then that request's time to first token
            # (which includes loading the new version into vLLM unless it was preloaded).
            waits.append(max(0.0, first.started - publish["at"]))
            firsts.append(first.ttft_s or first.latency_s)
        else:
            missed += 1  # superseded before any request of that user started (or the run ended)
    # An answer from a version older than one that already answered the same user.
    order = {(p["user"], p["version"]): n for n, p in enumerate(publishes)}
    stale = 0
    for user, rows in by_user.items():
        newest = -1
        for r in sorted(rows, key=lambda r: r.started):
            version = (r.adapter or "@").rsplit("@", 1)[1]
            rank = order.get((user, version), -1)
            if rank < newest:
                stale += 1
            newest = max(newest, rank)
    counts = [n for _, n in registered]
    return {
        "benchmark": "hot_swap",
        "machine": harness.machine(),
        "config": vars(args),
        "load": summary,
        "publishes": len(publishes),
        "swap_to_first_answer_s": {
            "n": len(swaps),
            "p50": statistics.median(swaps) if swaps else None,
            "p95": percentile(swaps, 0.95),
            "max": max(swaps) if swaps else None,
            "never_answered": missed,
            "wait_for_next_request_p50": percentile(waits, 0.5),
            "wait_for_next_request_p95": percentile(waits, 0.95),
            "first_request_ttft_p50": percentile(firsts, 0.5),
            "first_request_ttft_p95": percentile(firsts, 0.95),
        },
        "stale_answers": stale,
        "registered_adapters": {"max": max(counts), "last": counts[-1], "series": registered},
        "swap_latencies_s": swaps,
        "targets": {
            "errors": "0",
            "swap_to_first_answer_p95_s": "<= 1",
            "registered_adapters": "bounded",
        },
    }


def report(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    load, swap = result["load"], result["swap_to_first_answer_s"]
    table = Table(title="hot swap under load")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")

    def s(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f} s"

    rows = [
        ("requests / failed", f"{load['requests']} / {load['errors']}", "0 failed"),
        ("publishes", str(result["publishes"]), ""),
        (
            "adapter loads: preloaded / paid by a request",
            f"{result['adapter_loads']['preloaded']:.0f} / "
            f"{result['adapter_loads']['by_requests']:.0f}",
            "",
        ),
        ("publish -> first answer p50", s(swap["p50"]), ""),
        ("publish -> first answer p95", s(swap["p95"]), "<= 1 s"),
        ("publish -> first answer max", s(swap["max"]), ""),
        ("versions never answered (superseded first)", str(swap["never_answered"]), ""),
        (
            "  part: wait for the next request p50 / p95",
            f"{s(swap['wait_for_next_request_p50'])} / {s(swap['wait_for_next_request_p95'])}",
            "",
        ),
        (
            "  part: its TTFT (incl. any load) p50 / p95",
            f"{s(swap['first_request_ttft_p50'])} / {s(swap['first_request_ttft_p95'])}",
            "",
        ),
        ("answers from an older version after a newer one", str(result["stale_answers"]), "0"),
        (
            "adapter names in vLLM: max / at end",
            "{max} / {last}".format(**result["registered_adapters"]),
            "bounded",
        ),
        ("TTFT p50 / p95", f"{load['ttft_ms']['p50']:.0f} / {load['ttft_ms']['p95']:.0f} ms", ""),
        (
            "gateway RSS before / after",
            "{before:.0f} / {after:.0f} MB".format(**result["gateway_rss_mb"]),
            "",
        ),
    ]
    for row in rows:
        table.add_row(*row)
    Console(width=180).print(table)


def plot(result: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    swaps = sorted(result["swap_latencies_s"])
    axes[0].plot(swaps, [(i + 1) / len(swaps) for i in range(len(swaps))])
    axes[0].axvline(1.0, color="red", linestyle="--", label="target p95 1 s")
    axes[0].set_xlabel("publish -> first answer from it (s)")
    axes[0].set_ylabel("fraction of publishes")
    axes[0].legend()
    series = result["registered_adapters"]["series"]
    axes[1].plot([t for t, _ in series], [n for _, n in series])
    axes[1].set_xlabel("time (s)")
    axes[1].set_ylabel("adapter names in vLLM")
    fig.suptitle(f"hot swap: {result['config']['users']} users, {result['publishes']} publishes")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--versions", type=int, default=20, help="new versions per user")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument(
        "--preload",
        type=int,
        help="the gateway's adapter_preload (default: its own, vLLM's --max-cpu-loras; 0: off)",
    )
    parser.add_argument(
        "--publish-watch",
        type=float,
        help="the gateway's adapter_publish_watch_s (default: its own, 0.02 s; 0: off, the "
        "0.2 s per-slot poll alone)",
    )
    parser.add_argument(
        "--engine-cpus",
        help="CPUs for vLLM alone, e.g. 0: its compute threads bound and every engine thread "
        "pinned there, the gateway and this client on the rest (as beside a GPU engine)",
    )
    parser.add_argument("--name", default="hot_swap")
    args = parser.parse_args()
    result = asyncio.run(benchmark(args))
    report(result)
    harness.save(args.name, result, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
