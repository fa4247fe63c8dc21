"""Where a CPU-build vLLM computes, and where its gateway runs: apart.

vLLM's CPU build binds its model compute (OpenMP threads) to the cores `VLLM_CPU_OMP_THREADS_BIND`
names (by default every core but one, which it leaves to its own front end), but nothing keeps
other processes off those cores. A gateway that lands there takes time slices from every model
step: on a 2-core machine, 8 users streaming through a gateway got TTFT p50 259-451 ms with
every process free to run anywhere, and 28-35 ms with vLLM alone on one core
(`benchmarks/hot_swap.py`, docs/benchmarks.md).

`EngineSettings.cpu_cores` (`FEDPERSONA_ENGINE__CPU_CORES`, e.g. "0" or "0-5") names vLLM's
cores: the engine's launch binds its model compute there, an embedded engine (`fedpersona
serve`) runs wholly on them (its front end too: measured, that beat leaving the front end to
share the gateway's cores, `benchmarks/cpu_placement.py`), and the gateway moves itself to the
cores left (`Placement.gateway`) before it starts any thread; what it starts later (training
rounds run in-process: child processes) shares the gateway's cores. A GPU engine computes on the
GPU: leave it unset there.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

logger = logging.getLogger(__name__)


def parse_cpu_list(text: str) -> frozenset[int]:
    """CPUs named like the kernel's lists: "0", "0-3", "0,2-3". Raises ValueError."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, sep, last = part.strip().partition("-")
        if not first.isdigit() or (sep and not last.isdigit()):
            raise ValueError(f"not a CPU list (like 0 or 0-3 or 0,2-3): {text!r}")
        low, high = int(first), int(last) if sep else int(first)
        if high < low:
            raise ValueError(f"a CPU range runs low to high: {part.strip()!r} in {text!r}")
        cpus.update(range(low, high + 1))
    return frozenset(cpus)


@dataclass(frozen=True)
class Placement:
    compute: frozenset[int]  # vLLM's model compute (VLLM_CPU_OMP_THREADS_BIND)
    engine: frozenset[int]  # the CPUs the vLLM process runs on: the same
    gateway: frozenset[int]  # the gateway: the CPUs left


def plan(cpu_cores: str, allowed: set[int] | frozenset[int] | None = None) -> Placement:
    """The placement for `cpu_cores` among `allowed` (default: this process's CPUs). Raises
    ValueError when a named core is not available or none is left for the gateway."""
    allowed = frozenset(os.sched_getaffinity(0) if allowed is None else allowed)
    compute = parse_cpu_list(cpu_cores)
    missing = sorted(compute - allowed)
    if missing:
        raise ValueError(
            f"FEDPERSONA_ENGINE__CPU_CORES={cpu_cores} names CPUs {missing} this process may not "
            f"use (it may use {sorted(allowed)})"
        )
    gateway = allowed - compute
    if not gateway:
        raise ValueError(
            f"FEDPERSONA_ENGINE__CPU_CORES={cpu_cores} leaves no CPU for the gateway (of "
            f"{sorted(allowed)}): name fewer, or leave it unset"
        )
    return Placement(compute=compute, engine=compute, gateway=frozenset(gateway))


def keep_gateway_off(placement: Placement) -> None:
    """Move this process (and every thread it starts from now on) to `placement.gateway`."""
    os.sched_setaffinity(0, placement.gateway)
    logger.info(
        "engine compute on CPUs %s; the gateway on %s",
        _list(placement.compute),
        _list(placement.gateway),
    )


def _list(cpus: frozenset[int]) -> str:
    return ",".join(map(str, sorted(cpus)))
