"""A load client for the chat API: a workload, its arrivals, and one record per request.

A `Workload` says who asks (uniform or Zipf popularity over `Caller`s), when (a closed loop of
`concurrency` callers that ask again as soon as they are answered, or Poisson arrivals at
`rate_rps`), for how long, and what (streamed greedy chat requests). `run_load` sends it to one
or more base URLs (round robin per request; several gateways or several engines) and returns a
`LoadResult`: one `Record` per request (status, time to first token, latency, completion tokens,
the `x-fedpersona-adapter` that answered) and `summary()`, the numbers the benchmarks report.

Works the same against the gateway (`Caller(key=<user key>, model="personal")`) and straight
against vLLM (`Caller(key=<engine key>, model=<adapter name>)`), so both paths take one client.
Parses only what it needs from a stream (bytes checks for content, JSON only for the usage and
error chunks), so the client costs little next to what it measures. Knows nothing of the store,
the registry or the engine's internals.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import json
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import httpx

CHAT_PATH = "/v1/chat/completions"
ADAPTER_HEADER = "x-fedpersona-adapter"
PROMPTS = (
    "Tell me about the sea.",
    "What is the best way to learn a language?",
    "Describe your favourite meal.",
    "How do bridges stay up?",
    "Write a short poem about autumn.",
    "Why is the sky blue?",
    "Give me advice for a job interview.",
    "What happened in the story of the old king?",
)
Popularity = Literal["uniform", "zipf"]


@dataclass(frozen=True)
class Caller:
    """One identity of the workload: `key` is sent as a Bearer token, `model` as the model."""

    user: str
    key: str | None
    model: str = "personal"


@dataclass(frozen=True)
class Workload:
    """`rate_rps` set: Poisson arrivals (open loop); else `concurrency` closed-loop callers."""

    duration_s: float
    concurrency: int = 8
    rate_rps: float | None = None
    popularity: Popularity = "uniform"
    zipf_s: float = 1.1
    max_tokens: int = 32
    stream: bool = True
    seed: int = 0
    request_timeout_s: float = 120.0
    max_in_flight: int = 4096  # open loop: arrivals beyond this wait (and are counted late)
    # Closed loop only: each caller has one stream of its own (concurrency = callers), instead
    # of `concurrency` streams that each pick a caller by popularity for every request.
    stream_per_caller: bool = False

    def __post_init__(self) -> None:
        if self.duration_s <= 0:
            raise ValueError(f"duration_s must be > 0, got {self.duration_s}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.rate_rps is not None and self.rate_rps <= 0:
            raise ValueError(f"rate_rps must be > 0, got {self.rate_rps}")
        if self.popularity not in ("uniform", "zipf"):
            raise ValueError(f"popularity must be uniform or zipf, got {self.popularity!r}")
        if self.zipf_s <= 0:
            raise ValueError(f"zipf_s must be > 0, got {self.zipf_s}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


@dataclass
class Record:
    """One request. Times are seconds; `started` is on the `time.perf_counter` clock, so a
    benchmark can line records up with its own events (a publish, a replica killed)."""

    user: str
    target: str
    started: float
    status: int = 0  # 0: no HTTP status (connection failed, timed out)
    ttft_s: float | None = None
    latency_s: float = 0.0
    tokens: int = 0
    adapter: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def popularity_weights(n: int, popularity: Popularity, s: float = 1.1) -> list[float]:
    """Cumulative weights for `random.choices`: equal, or Zipf (rank k has weight 1/k^s)."""
    if n < 1:
        raise ValueError("a workload needs at least one caller")
    weights = [1.0] * n if popularity == "uniform" else [1.0 / (k**s) for k in range(1, n + 1)]
    return list(itertools.accumulate(weights))


def pick(rng: random.Random, cumulative: Sequence[float]) -> int:
    """An index drawn with the given cumulative weights."""
    return min(bisect.bisect_right(cumulative, rng.random() * cumulative[-1]), len(cumulative) - 1)


def poisson_arrivals(rng: random.Random, rate_rps: float, duration_s: float) -> list[float]:
    """Arrival offsets (seconds from the start) of a Poisson process over `duration_s`."""
    times, t = [], rng.expovariate(rate_rps)
    while t < duration_s:
        times.append(t)
        t += rng.expovariate(rate_rps)
    return times


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank `q` quantile (0..1) of `values`, None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def chat_body(workload: Workload, caller: Caller, n: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": caller.model,
        "messages": [{"role": "user", "content": PROMPTS[n % len(PROMPTS)]}],
        "max_tokens": workload.max_tokens,
        "temperature": 0.0,
        "stream": workload.stream,
    }
    if workload.stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def send(
    client: httpx.AsyncClient, target: str, caller: Caller, body: dict[str, Any]
) -> Record:
    """One request to `target` (a base URL), recorded; never raises for a failed request."""
    headers = {"Authorization": f"Bearer {caller.key}"} if caller.key else {}
    record = Record(user=caller.user, target=target, started=time.perf_counter())
    try:
        if body.get("stream"):
            await _stream(client, target + CHAT_PATH, headers, body, record)
        else:
            response = await client.post(target + CHAT_PATH, json=body, headers=headers)
            record.status = response.status_code
            record.adapter = response.headers.get(ADAPTER_HEADER)
            if response.status_code != 200:
                record.error = f"{response.status_code}: {response.text[:200]}"
            else:
                usage = response.json().get("usage") or {}
                record.tokens = int(usage.get("completion_tokens") or 0)
    except httpx.HTTPError as e:
        record.error = f"{type(e).__name__}: {e}"
    record.latency_s = time.perf_counter() - record.started
    return record


async def _stream(
    client: httpx.AsyncClient,
    url: str,
    headers: dict[str, str],
    body: dict[str, Any],
    record: Record,
) -> None:
    async with client.stream("POST", url, json=body, headers=headers) as response:
        record.status = response.status_code
        record.adapter = response.headers.get(ADAPTER_HEADER)
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            record.error = f"{response.status_code}: {text[:200]}"
            return
        done = False
        pending = b""
        async for chunk in response.aiter_bytes():
            pending += chunk
            *events, pending = pending.split(b"\n\n")
            for event in events:
                done = _read_event(event.strip(), record) or done
        if pending.strip():
            done = _read_event(pending.strip(), record) or done
        if record.error is None and not done:
            record.error = "stream ended without [DONE]"


def _read_event(event: bytes, record: Record) -> bool:
    """Take what `record` needs from one SSE event; True for `[DONE]`."""
    if event == b"data: [DONE]":
        return True
    if record.ttft_s is None and b'"content":"' in event and b'"content":""' not in event:
        record.ttft_s = time.perf_counter() - record.started
    if b'"usage"' in event or b'"error"' in event:
        try:
            payload = json.loads(event.removeprefix(b"data:"))
        except ValueError:
            record.error = f"unreadable event: {event[:200]!r}"
            return False
        if isinstance(payload, dict):
            if isinstance(payload.get("error"), dict):
                record.error = f"stream error: {payload['error'].get('message')}"
            usage = payload.get("usage")
            if isinstance(usage, dict):
                record.tokens = int(usage.get("completion_tokens") or 0)
    return False


@dataclass
class LoadResult:
    workload: Workload
    targets: list[str]
    records: list[Record] = field(default_factory=list)
    wall_s: float = 0.0
    late_arrivals: int = 0  # open loop: arrivals that waited for a free slot

    def summary(self) -> dict[str, Any]:
        """Counts, throughput and latency quantiles (milliseconds) over all records."""
        ok = [r for r in self.records if r.ok]
        tokens = sum(r.tokens for r in ok)
        ttft = [r.ttft_s * 1000 for r in ok if r.ttft_s is not None]
        latency = [r.latency_s * 1000 for r in ok]
        errors = Counter(r.error.split(":")[0] for r in self.records if r.error is not None)
        return {
            "requests": len(self.records),
            "ok": len(ok),
            "errors": len(self.records) - len(ok),
            "error_kinds": dict(errors),
            "wall_s": self.wall_s,
            "requests_per_s": len(ok) / self.wall_s if self.wall_s else 0.0,
            "tokens": tokens,
            "tokens_per_s": tokens / self.wall_s if self.wall_s else 0.0,
            "ttft_ms": _quantiles(ttft),
            "latency_ms": _quantiles(latency),
            "users_seen": len({r.user for r in self.records}),
            "per_target": dict(Counter(r.target for r in self.records)),
            "late_arrivals": self.late_arrivals,
        }

    def to_json(self, *, records: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "workload": asdict(self.workload),
            "targets": self.targets,
            "summary": self.summary(),
        }
        if records:
            out["records"] = [asdict(r) for r in self.records]
        return out


def _quantiles(values: list[float]) -> dict[str, float | None]:
    return {
        "p50": statistics.median(values) if values else None,
        "p95": percentile(values, 0.95),
        "p99": percentile(values, 0.99),
        "mean": statistics.fmean(values) if values else None,
    }


async def run_load(
    workload: Workload,
    callers: Sequence[Caller],
    targets: Sequence[str],
    *,
    client: httpx.AsyncClient | None = None,
    on_record: Callable[[Record], None] | None = None,
) -> LoadResult:
    """Send `workload` from `callers` to `targets` (base URLs, without /v1). Requests still in
    flight when the duration ends are awaited and recorded; `wall_s` includes that drain."""
    if not targets:
        raise ValueError("run_load needs at least one target URL")
    rng = random.Random(workload.seed)
    cumulative = popularity_weights(len(callers), workload.popularity, workload.zipf_s)
    result = LoadResult(workload=workload, targets=[t.rstrip("/") for t in targets])
    counter = itertools.count()
    own = client is None
    if client is None:
        size = workload.max_in_flight if workload.rate_rps else workload.concurrency
        if workload.stream_per_caller and not workload.rate_rps:
            size = len(callers)
        client = httpx.AsyncClient(
            timeout=httpx.Timeout(workload.request_timeout_s, connect=10.0),
            # Idle connections are dropped before the server's 5 s keep-alive timeout closes
            # them, so a request never races a closing connection.
            limits=httpx.Limits(
                max_connections=size + 8, max_keepalive_connections=size + 8, keepalive_expiry=4.0
            ),
        )

    async def one(fixed: Caller | None = None) -> None:
        n = next(counter)
        caller = fixed or callers[pick(rng, cumulative)]
        target = result.targets[n % len(result.targets)]
        record = await send(client, target, caller, chat_body(workload, caller, n))
        result.records.append(record)
        if on_record is not None:
            on_record(record)

    started = time.perf_counter()
    deadline = started + workload.duration_s
    try:
        if workload.rate_rps is None:

            async def loop(fixed: Caller | None) -> None:
                while time.perf_counter() < deadline:
                    await one(fixed)

            if workload.stream_per_caller:
                await asyncio.gather(*(loop(c) for c in callers))
            else:
                await asyncio.gather(*(loop(None) for _ in range(workload.concurrency)))
        else:
            slots = asyncio.Semaphore(workload.max_in_flight)
            tasks = []

            async def bounded() -> None:
                async with slots:
                    await one()

            for offset in poisson_arrivals(rng, workload.rate_rps, workload.duration_s):
                delay = started + offset - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if slots.locked():
                    result.late_arrivals += 1
                tasks.append(asyncio.create_task(bounded()))
            await asyncio.gather(*tasks)
    finally:
        result.wall_s = time.perf_counter() - started
        if own:
            await client.aclose()
    return result
