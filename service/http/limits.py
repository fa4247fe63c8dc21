"""Per-user concurrency: how many chat requests one user may have running at once.

Complements the token bucket of `fedpersona.service.ratelimit` (requests per minute): a bucket
lets a user start 20 slow streams in a burst; this caps how many run at the same time, so one
user cannot hold the engine's batch. Pure bookkeeping, in memory, per gateway process; no I/O.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from fedpersona.service.errors import TooManyInFlight


class InFlightLimiter:
    """`acquire(user)` takes one of `limit` slots or raises `TooManyInFlight` (429);
    `limit=0` disables the cap."""

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        self.limit = limit
        self._running: dict[str, int] = {}
        self._lock = threading.Lock()

    def running(self, user: str) -> int:
        return self._running.get(user, 0)

    def acquire(self, user: str) -> None:
        with self._lock:
            count = self._running.get(user, 0)
            if self.limit and count >= self.limit:
                raise TooManyInFlight(retry_after=1)
            self._running[user] = count + 1

    def release(self, user: str) -> None:
        with self._lock:
            count = self._running.get(user, 0) - 1
            if count > 0:
                self._running[user] = count
            else:
                self._running.pop(user, None)

    def hold(self, user: str) -> Callable[[], None]:
        """Take a slot; returns its release, which may safely be called more than once."""
        self.acquire(user)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.release(user)

        return release
