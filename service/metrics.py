"""Prometheus metrics of one gateway app, in its own `CollectorRegistry`.

Each `Metrics` owns a registry (never the process-global one), so tests can build many apps and
two apps in one process never share counters. Labels are bounded: route templates, status codes,
and what answered a chat (`ServedKind`: `personal`, `global`, `base`); never a user id, key or
free-form model name.

`fedpersona.service.engine.adapters.AdapterManager` updates `adapter_loads`, `adapter_preloads`
(the loads its preloader made: `adapter_loads - adapter_preloads` were paid by a request),
`adapter_unloads`, `adapter_evictions` and `adapter_load_seconds`.
"""

from __future__ import annotations

from enum import StrEnum

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServedKind(StrEnum):
    """The `kind` label of chat metrics: what the engine answered with, not what was asked for.

    `personal`: the user's own adapter; `global`: a federation-wide adapter (a user without one
    of their own, on cold start); `base`: the base model (asked for by name, or no adapter to
    serve)."""

    PERSONAL = "personal"
    GLOBAL = "global"
    BASE = "base"


# Latency buckets from a few ms (cached, tiny model) to minutes (CPU engine, long outputs).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "fedpersona_http_requests",
            "HTTP requests by route template, method and status code",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "fedpersona_http_request_seconds",
            "HTTP request latency until the response (or the whole stream) finished",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.chat_seconds = Histogram(
            "fedpersona_chat_seconds",
            "chat completion latency, end to end",
            ["kind", "stream"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft_seconds = Histogram(
            "fedpersona_chat_ttft_seconds",
            "time to first token of streamed chat completions",
            ["kind"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "fedpersona_prompt_tokens", "prompt tokens processed", ["kind"], registry=r
        )
        self.completion_tokens = Counter(
            "fedpersona_completion_tokens", "completion tokens generated", ["kind"], registry=r
        )
        self.rate_limited = Counter(
            "fedpersona_rate_limited_requests", "requests refused by the rate limiter", registry=r
        )
        self.stream_errors = Counter(
            "fedpersona_stream_errors", "streams that ended with an error event", registry=r
        )
        self.engine_errors = Counter(
            "fedpersona_engine_errors",
            "engine failures by kind",
            ["kind"],
            registry=r,
        )
        self.streams_in_flight = Gauge(
            "fedpersona_streams_in_flight", "streamed responses currently open", registry=r
        )
        self.adapter_loads = Counter(
            "fedpersona_adapter_loads", "LoRA adapters loaded into the engine", registry=r
        )
        self.adapter_preloads = Counter(
            "fedpersona_adapter_preloads",
            "adapters loaded ahead of any request for them, a subset of loads (the rest were "
            "loaded by a request, which waited for it)",
            registry=r,
        )
        self.adapter_unloads = Counter(
            "fedpersona_adapter_unloads", "LoRA adapters unloaded from the engine", registry=r
        )
        self.adapter_evictions = Counter(
            "fedpersona_adapter_evictions",
            "adapters unloaded to make room (LRU), a subset of unloads",
            registry=r,
        )
        self.adapter_load_seconds = Histogram(
            "fedpersona_adapter_load_seconds",
            "time to load one adapter into the engine",
            buckets=_LOAD_BUCKETS,
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
