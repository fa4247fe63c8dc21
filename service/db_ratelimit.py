"""Per-user rate limits kept in the database, so every gateway sharing it enforces one limit.

The same token bucket as `fedpersona.service.ratelimit.RateLimiter` (`burst` tokens, refilled at
`rate_per_s`), stored as one row per user in `rate_limits` (schema:
`fedpersona.service.db_migrations`) and updated by a single atomic `INSERT ... ON CONFLICT DO
UPDATE ... RETURNING` statement: concurrent requests from any number of gateways serialize on
the row, and each sees the tokens the previous one left. Time is the database server's clock
unless a clock is injected (tests), so gateways with skewed clocks still agree.

Which limiter a gateway uses (`rate_limiter_for`): `rate_limit_scope` "database" uses this one,
"process" the in-memory bucket (each gateway process enforces the full limit on its own, so N
replicas let a user through at up to N x rate_limit_rpm and N x rate_limit_burst), and "auto"
(the default) picks the database on PostgreSQL and the process bucket on SQLite, where one
database write per request would serialize all gateways on the file's lock.
"""

from __future__ import annotations

from collections.abc import Callable

from fedpersona.service.db import Database
from fedpersona.service.ratelimit import RateLimiter
from fedpersona.service.settings import Settings


class DatabaseRateLimiter(RateLimiter):
    blocking = True  # a round trip to the database

    def __init__(
        self,
        database: Database,
        *,
        rate_per_s: float,
        burst: int,
        clock: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(rate_per_s=rate_per_s, burst=burst)
        self.database = database
        self._db_clock = clock
        db = database
        now = "?" if clock is not None else db.sql_now()
        elapsed = db.sql_greatest("0", "excluded.updated - rate_limits.updated")
        refilled = db.sql_least("?", f"rate_limits.tokens + {elapsed} * ?")
        # Parameters, in order: bucket, first tokens, [now], then (burst, rate) for each of the four
        # uses of `refilled`.
        self._sql = (
            "INSERT INTO rate_limits(bucket, tokens, updated, granted) "
            f"VALUES (?, ?, {now}, 1) "
            "ON CONFLICT (bucket) DO UPDATE SET "
            f"tokens = CASE WHEN {refilled} >= 1 THEN {refilled} - 1 ELSE {refilled} END, "
            f"granted = CASE WHEN {refilled} >= 1 THEN 1 ELSE 0 END, "
            f"updated = {db.sql_greatest('rate_limits.updated', 'excluded.updated')} "
            "RETURNING tokens, granted"
        )

    def acquire(self, key: str) -> float | None:
        """Take one token for `key`: None if granted, else seconds until one is available."""
        params: list[object] = [key, float(self.burst) - 1.0]
        if self._db_clock is not None:
            params.append(self._db_clock())
        params += [float(self.burst), self.rate_per_s] * 4
        tokens, granted = self.database.statement(self._sql, params)
        if granted:
            return None
        return max(0.0, 1.0 - float(tokens)) / self.rate_per_s

    def forget(self, key: str) -> None:
        self.database.statement("DELETE FROM rate_limits WHERE bucket = ? RETURNING bucket", [key])


def rate_limiter_for(settings: Settings, database: Database) -> RateLimiter | None:
    """The limiter `settings` ask for (None: limiting disabled); see the module doc."""
    if settings.rate_limit_rpm <= 0:
        return None
    scope = settings.rate_limit_scope
    if scope == "auto":
        scope = "database" if database.dialect == "postgresql" else "process"
    rate = settings.rate_limit_rpm / 60.0
    if scope == "database":
        return DatabaseRateLimiter(database, rate_per_s=rate, burst=settings.rate_limit_burst)
    return RateLimiter(rate_per_s=rate, burst=settings.rate_limit_burst)
