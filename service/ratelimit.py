"""Per-user request rate limiting: one token bucket per user, in memory.

Pure logic with an injectable clock: no I/O, no HTTP. A bucket holds up to `burst` tokens and
refills at `rate_per_s`; each request takes one token or is refused with the time until one will
be there (the `Retry-After`). State is per gateway process: N gateway processes on SQLite let a
user through at up to N x the rate (and N x the burst). Gateways sharing a PostgreSQL database
keep the buckets there instead (`fedpersona.service.db_ratelimit`), one limit for all.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    # Whether `acquire` may block (I/O): callers on the event loop hand it to a thread if so.
    blocking = False

    def __init__(
        self,
        *,
        rate_per_s: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be > 0 and burst >= 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    @classmethod
    def per_minute(cls, rpm: float, *, burst: int) -> RateLimiter | None:
        """None when `rpm` is 0 (limiting disabled)."""
        return None if rpm <= 0 else cls(rate_per_s=rpm / 60.0, burst=burst)

    def acquire(self, key: str) -> float | None:
        """Take one token for `key`: None if granted, else seconds until one is available."""
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = _Bucket(tokens=float(self.burst), updated=now)
            elapsed = max(0.0, now - bucket.updated)
            bucket.tokens = min(float(self.burst), bucket.tokens + elapsed * self.rate_per_s)
            bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return None
            return (1.0 - bucket.tokens) / self.rate_per_s

    def forget(self, key: str) -> None:
        with self._lock:
            self._buckets.pop(key, None)
