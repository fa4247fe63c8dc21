"""What the serving benchmarks share: real processes on loopback, published users, measurements.

- `stub_engine(...)`: `fedpersona.service.load.stub_engine` in its own process (an engine that
  answers at once), `vllm(...)`: a real vLLM through `EngineSupervisor`, as `fedpersona serve`
  starts it;
- `gateway(...)`: a real `fedpersona serve --engine-url ... --no-rounds` process (settings by
  environment, as in the chart), optionally under cProfile;
- `publish_users(...)`: one random LoRA per user in a store and a key per user in a registry;
- `Proc`: CPU seconds and resident memory of a process (psutil), for CPU-per-token and
  memory-flatness numbers; `machine()`: what the numbers were measured on;
- `write_result(...)`: JSON under benchmarks/results/.

Not a library of the package: benchmarks import it by path, tests never do.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
ADMIN_KEY = "benchmark-admin-key-0123456789abcdef"
ENGINE_KEY = "benchmark-engine-key-0123456789abcdef"

from fedpersona.adapters import AdapterStore, LoraAdapter, Slot, Version  # noqa: E402
from fedpersona.service.load.client import Caller  # noqa: E402
from fedpersona.service.registry import Registry  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "load_avg_1m": os.getloadavg()[0],
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def micro_model_dir() -> Path:
    """The micro test model (built once into .cache), the benchmarks' default."""
    from fedpersona.trainer.models.basemodel import MICRO, build_models

    return build_models(
        REPO / ".cache" / "models" / f"micro-{MICRO.hash()}", MICRO, progress=False
    ).large.path


def random_lora(model_dir: Path, base_model: str, seed: int, r: int = 8) -> LoraAdapter:
    """A random rank-`r` LoRA on q_proj and o_proj of every layer of the model at `model_dir`."""
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


@dataclass
class Users:
    store: AdapterStore
    registry_file: Path
    keys: dict[str, str]  # user -> API key
    versions: dict[str, Version]  # user -> first published served version

    def callers(self, names: Sequence[str] | None = None) -> list[Caller]:
        return [Caller(u, self.keys[u]) for u in (names or list(self.keys))]


def publish_users(
    home: Path, users: Sequence[str], *, model_dir: Path, model: str, seed: int = 0
) -> Users:
    """A store at home/store with one LoRA per user, and their keys in home/registry.sqlite.
    A home that already holds these users (its keys.json) is reused as it is."""
    store = AdapterStore(home / "store", max_rank=16)
    registry_file = home / "registry.sqlite"
    saved = home / "keys.json"
    if saved.is_file():
        keys = json.loads(saved.read_text())
        if list(keys) == list(users):
            current = {u: store.current(Slot.user_served(u)) for u in users}
            versions = {u: v for u, v in current.items() if v is not None}
            return Users(store, registry_file, keys, versions)
    registry = Registry(registry_file)
    keys, versions = {}, {}
    for i, user in enumerate(users):
        versions[user] = store.publish_lora(
            Slot.user_served(user), random_lora(model_dir, model, seed=seed + i)
        )
        registry.create_user(user)
        keys[user] = registry.issue_key(user).api_key
    saved.write_text(json.dumps(keys))
    return Users(store, registry_file, keys, versions)


class Proc:
    """A started process and its psutil handle (CPU seconds, resident memory)."""

    def __init__(self, popen: subprocess.Popen[bytes], name: str) -> None:
        self.popen = popen
        self.name = name
        self.ps = psutil.Process(popen.pid)

    def cpu_s(self) -> float:
        """User + system CPU seconds of the process and its children so far."""
        total = 0.0
        for p in [self.ps, *self.ps.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def rss_mb(self) -> float:
        return self.ps.memory_info().rss / 2**20

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def pin_tree(pid: int, cpus: set[int]) -> int:
    """Pin process `pid`, its children and every thread of them to `cpus`; returns how many
    threads were pinned. (A thread started later inherits its creator's CPUs.)"""
    root = psutil.Process(pid)
    pinned = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            for thread in proc.threads():
                os.sched_setaffinity(thread.id, cpus)
                pinned += 1
        except (psutil.NoSuchProcess, ProcessLookupError):
            continue
    return pinned


def split_cpus(spec: str | None) -> tuple[set[int], set[int]] | None:
    """(the engine's CPUs, everyone else's) for an `--engine-cpus` value such as "0", or None."""
    if not spec:
        return None
    mine = set(os.sched_getaffinity(0))
    engine = {int(c) for c in spec.split(",")}
    rest = mine - engine
    if not engine <= mine or not rest:
        raise SystemExit(f"--engine-cpus {spec}: needs a strict subset of {sorted(mine)}")
    return engine, rest


def bind_engine_threads(cpus: tuple[set[int], set[int]] | None) -> None:
    """Before starting vLLM: its CPU build binds its compute threads where this says (pinning
    the process alone is not enough, it binds them itself)."""
    if cpus is not None:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, sorted(cpus[0])))


def place_engine(pid: int | None, cpus: tuple[set[int], set[int]] | None) -> None:
    """Pin the engine's process tree to its CPUs and this process (so whatever it starts
    later: gateways, relays) to the rest."""
    if cpus is None or pid is None:
        return
    pinned = pin_tree(pid, cpus[0])
    os.sched_setaffinity(0, cpus[1])
    print(f"engine: {pinned} threads on CPUs {sorted(cpus[0])}; the rest on {sorted(cpus[1])}")


def median_at(rows: Sequence[Any], *keys: str) -> float:
    """The median over `rows` of `row[keys[0]][keys[1]]...`."""
    values = []
    for row in rows:
        value: Any = row
        for key in keys:
            value = value[key]
        values.append(value)
    return statistics.median(values)


def wait_ready(url: str, proc: Proc, timeout: float = 900.0) -> float:
    """Seconds until `url`/ready answers 200 (a gateway with its own vLLM: once that is up)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}")
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready in {timeout} s")


def this_process_cpu_s() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system


def wait_healthy(url: str, proc: Proc | None = None, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not become healthy in {timeout} s")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


@contextmanager
def stub_engine(
    model: str, *, tokens: int = 64, token_delay_ms: float = 0.0, log: Path | None = None
) -> Iterator[tuple[str, Proc]]:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "fedpersona.service.load.stub_engine",
        "--port",
        str(port),
        "--model",
        model,
        "--tokens",
        str(tokens),
        "--token-delay-ms",
        str(token_delay_ms),
    ]
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
    proc = Proc(subprocess.Popen(command, env=_env(), stdout=out, stderr=out), "stub engine")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        yield url, proc
    finally:
        proc.stop()


@contextmanager
def gateway(
    home: Path,
    *,
    model: str,
    engine_url: str | None = None,
    replicas: Sequence[str] = (),
    max_model_len: int = 512,
    engine_key: str | None = None,
    profile: Path | None = None,
    env: dict[str, str] | None = None,
    nice: int = 0,
) -> Iterator[tuple[str, Proc]]:
    """`fedpersona serve --no-rounds` on a free port in front of `engine_url` (or `replicas`),
    with the store and registry of `home`. `profile`: run under cProfile, stats written there
    when the process exits; `nice`: its CPU priority (niceness)."""
    port = free_port()
    settings = {
        "FEDPERSONA_HOME": str(home),
        "FEDPERSONA_ADMIN_KEY": ADMIN_KEY,
        "FEDPERSONA_RATE_LIMIT_RPM": "0",
        "FEDPERSONA_MAX_IN_FLIGHT_PER_USER": "0",
        "FEDPERSONA_ENGINE__SERVED_MODEL_NAME": model,
        "FEDPERSONA_ENGINE__MAX_MODEL_LEN": str(max_model_len),
        **({"FEDPERSONA_ENGINE__API_KEY": engine_key} if engine_key else {}),
        **({"FEDPERSONA_REPLICAS": json.dumps(list(replicas))} if replicas else {}),
        **(env or {}),
    }
    if profile is not None:
        command = [sys.executable, __file__, "--profile-serve", str(profile)]
    else:
        command = [sys.executable, "-m", "fedpersona.service.commands.serve"]
    command += ["--port", str(port), "--no-rounds"]
    if nice:
        command = ["nice", "-n", str(nice), *command]
    if engine_url:
        command += ["--engine-url", engine_url]
    log = open(home / f"gateway-{port}.log", "wb")  # noqa: SIM115
    proc = Proc(
        subprocess.Popen(command, env={**_env(), **settings}, stdout=log, stderr=log),
        f"gateway :{port}",
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        yield url, proc
    finally:
        # uvicorn re-raises the signal after its graceful shutdown: SIGINT ends in a
        # KeyboardInterrupt, which lets cProfile write its stats; SIGTERM would not.
        proc.stop(signal.SIGINT if profile is not None else signal.SIGTERM)
        log.close()


@asynccontextmanager
async def vllm(
    model_dir: Path,
    home: Path,
    *,
    max_loras: int = 4,
    max_cpu_loras: int = 8,
    max_model_len: int = 512,
    name: str = "vllm",
) -> AsyncIterator[tuple[str, Any]]:
    """A real vLLM (CPU build) on `model_dir`, with the engine key; yields (url, supervisor)."""
    from fedpersona.adapters.manifest import model_name
    from fedpersona.service.engine.config import EngineSettings, build_launch
    from fedpersona.service.engine.supervisor import EngineSupervisor

    settings = EngineSettings(
        model_dir=model_dir,
        served_model_name=model_name(model_dir),
        port=free_port(),
        max_loras=max_loras,
        max_cpu_loras=max_cpu_loras,
        max_lora_rank=16,
        max_model_len=max_model_len,
        kv_cache_gib=1,
        api_key=ENGINE_KEY,
    )
    launch = build_launch(settings, home=home / name)
    supervisor = EngineSupervisor(launch, log_path=home / f"{name}.log", max_restarts=0)
    started = time.monotonic()
    await supervisor.start()
    try:
        await supervisor.wait_ready(timeout=600)
        print(f"{name} ready in {time.monotonic() - started:.0f} s", flush=True)
        yield launch.base_url, supervisor
    finally:
        await supervisor.stop(5.0)


async def registered(url: str) -> list[str]:
    """Names vLLM serves now (base model and adapters)."""
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.get(
            f"{url}/v1/models", headers={"Authorization": f"Bearer {ENGINE_KEY}"}
        )
        response.raise_for_status()
        return [card["id"] for card in response.json()["data"]]


async def counter(gateway_url: str, name: str) -> float:
    """A gateway counter's value from its `/metrics` (summed over labels; 0 if absent)."""
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(f"{gateway_url}/metrics")).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(f"{name}_total")
    )


def temp_home(prefix: str, reuse: Path | None = None) -> Path:
    """A new temporary home, or `reuse` (created if missing) to keep published users."""
    if reuse is not None:
        reuse.mkdir(parents=True, exist_ok=True)
        return reuse
    return Path(tempfile.mkdtemp(prefix=f"fedpersona-{prefix}-"))


def pyplot() -> Any:
    """matplotlib.pyplot, drawing to files (no screen here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(name: str, result: dict[str, Any], plot: Any) -> Path:
    """Write `result` as results/<name>.json and `plot(result, path)` beside it as .png."""
    path = write_result(name, result)
    plot(result, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return path


def write_result(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path


def run_async(coro: Any) -> Any:
    return asyncio.run(coro)


def profile_serve(out: str, argv: list[str]) -> None:
    """`fedpersona serve ARGV` under cProfile on the process CPU clock (time waiting on the
    network or for a core does not count), stats written to `out` when it stops."""
    import cProfile
    import runpy

    profiler = cProfile.Profile(time.process_time)
    sys.argv = ["fedpersona serve", *argv]
    profiler.enable()
    try:
        runpy.run_module("fedpersona.service.commands.serve", run_name="__main__")
    except (SystemExit, KeyboardInterrupt):
        pass
    finally:
        profiler.disable()
        profiler.dump_stats(out)


if __name__ == "__main__" and sys.argv[1:2] == ["--profile-serve"]:
    profile_serve(sys.argv[2], sys.argv[3:])
