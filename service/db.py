"""The gateway's database: an embedded SQLite file (the default) or a shared PostgreSQL server.

One small interface over both, so the registry (`fedpersona.service.registry`) and the shared
rate limiter (`fedpersona.service.db_ratelimit`) write their SQL once: `?` placeholders (turned
into psycopg's `%s` for PostgreSQL), identifiers that are reserved in PostgreSQL double-quoted
(`"user"`), and no dialect-specific function outside `Database.sql_least/sql_greatest/sql_now`.
The schema and its versions are owned by `fedpersona.service.db_migrations`.

- SQLite: WAL so the CLI can write while gateways read, the file created owner-only. Safe for
  the processes of one machine; SQLite locking over network file systems is not, so gateways on
  several nodes share a PostgreSQL server instead. Connections are kept open between
  transactions in a small per-process pool (`_SqlitePool`: each used by one thread at a time,
  never across a fork), so a key check costs a query, not an open. A pooled connection is only
  reused while the file is the one it opened: a file deleted, replaced (by another file or in
  place), or made unreadable/unwritable (chmod, chattr, a read-only mount) since then makes the
  next transaction open afresh, as every transaction did before the pool, with the same errors.
  Each write transaction ends with a checkpoint that empties the WAL, as closing the last
  connection did: the file at rest holds every committed write, and a file put in its place is
  never read through the old one's WAL. (One difference remains: a directory made unwritable
  under a running gateway keeps serving reads from the WAL files its connections hold open;
  before, the next open failed when they had happened to be removed.)
- PostgreSQL (`postgresql://...`, psycopg 3): a thread-safe connection pool per process. Reads
  are single statements in autocommit (the registry never reads twice in one operation). Write
  transactions of the registry (`transaction(write=True)`) take one transaction-scoped advisory
  lock, so concurrent admin writes from many gateways serialize exactly like SQLite's
  `BEGIN IMMEDIATE` (they are rare; reads and `statement` never take it).

The URL is a secret (it may hold a password): `describe()` is what logs and errors show.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Literal, Protocol, cast
from urllib.parse import urlsplit

from fedpersona.service.errors import RegistryUnavailable

Dialect = Literal["sqlite", "postgresql"]
POSTGRES_SCHEMES = ("postgresql", "postgres")
# pg_advisory_xact_lock key of registry writes and of migrations ("fp" "reg" / "fp" "mig").
REGISTRY_WRITE_LOCK = 0x6670_7265_67
MIGRATION_LOCK = 0x6670_6D69_67

logger = logging.getLogger(__name__)


class DatabaseError(RuntimeError):
    """The configured database cannot be used; the message says why, without secrets."""


class DatabaseUnavailable(DatabaseError):
    """The configured database cannot be reached or opened."""


class Result(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Transaction(Protocol):
    def execute(self, sql: str, params: Sequence[Any] = ()) -> Result: ...


def is_postgres_url(location: object) -> bool:
    return isinstance(location, str) and urlsplit(location).scheme in POSTGRES_SCHEMES


def redact_url(url: str) -> str:
    """`url` without its password (for logs and error messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


class Database(ABC):
    dialect: Dialect
    # Whether one indexed read is quicker than handing it to a thread: true for SQLite (a local
    # file; in WAL mode a reader never waits for a writer), so the gateway's per-request key
    # check runs inline on the event loop (~50 us) rather than in a thread (~135 us idle, more
    # when the loop is busy). False for PostgreSQL: a network round trip stays off the loop.
    quick_reads: bool = False

    @abstractmethod
    def transaction(self, *, write: bool = False) -> AbstractContextManager[Transaction]:
        """One transaction: committed when the block ends, rolled back if it raises."""

    def statement(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run one atomic writing statement in its own transaction; its first row (or None)."""
        with self.transaction(write=True) as tx:
            return tx.execute(sql, params).fetchone()

    def query_one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run one reading statement (a snapshot of its own); its first row (or None)."""
        with self.transaction() as tx:
            return tx.execute(sql, params).fetchone()

    @abstractmethod
    def describe(self) -> str:
        """Where the data is, safe to log."""

    @abstractmethod
    def close(self) -> None:
        """Release pooled connections (PostgreSQL: the object is unusable afterwards; SQLite
        opens connections again when used)."""

    # Portable spellings of the few functions whose names differ.
    def sql_least(self, *args: str) -> str:
        return f"{'MIN' if self.dialect == 'sqlite' else 'LEAST'}({', '.join(args)})"

    def sql_greatest(self, *args: str) -> str:
        return f"{'MAX' if self.dialect == 'sqlite' else 'GREATEST'}({', '.join(args)})"

    def sql_now(self) -> str:
        """The database server's wall clock in seconds since the epoch (one clock for all)."""
        if self.dialect == "sqlite":
            return "((julianday('now') - 2440587.5) * 86400.0)"
        return "(EXTRACT(EPOCH FROM clock_timestamp())::double precision)"


# Idle SQLite connections kept per database and process; more in flight at once are opened as
# needed and closed after their transaction (the gateway's thread pools are larger than this).
SQLITE_IDLE_CONNECTIONS = 8

# What a pooled SQLite connection was opened on: the file's device, inode and change time (set
# by chmod, chown, chattr and any write to the main file, e.g. a checkpoint or a copy over it)
# and whether this process may write it (False on a read-only mount or an immutable file, even
# as root). Any difference: not the same database any more, open afresh.
_FileIdentity = tuple[int, int, int, bool]


def _identity(path: Path) -> _FileIdentity | None:
    """The identity of the file at `path` now; None if there is none (SQLite will create it)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_ctime_ns, os.access(path, os.W_OK))


class _SqlitePool:
    """Open SQLite connections of one file for reuse by any thread, one thread at a time.

    `checkout` hands out an idle connection opened on the file as it is now, or opens one;
    `checkin` keeps it if its transaction ended cleanly. Connections inherited through a fork
    are dropped, never used. `close` closes the idle ones; connections in use are closed when
    they come back.
    """

    def __init__(self, path: Path, open_: Callable[[], sqlite3.Connection]) -> None:
        self.path = path
        self._open = open_
        self._lock = threading.Lock()
        self._idle: list[tuple[sqlite3.Connection, _FileIdentity]] = []
        self._pid = os.getpid()
        self._generation = 0

    def checkout(self) -> tuple[sqlite3.Connection, _FileIdentity | None, int]:
        identity = _identity(self.path)
        stale: list[sqlite3.Connection] = []
        found: sqlite3.Connection | None = None
        with self._lock:
            self._forget_if_forked()
            generation = self._generation
            if self._idle and (identity is None or self._idle[-1][1] != identity):
                # The file changed: no connection opened before may serve it (see the module doc).
                stale = [conn for conn, _ in self._idle]
                self._idle.clear()
            if self._idle:
                found = self._idle.pop()[0]
        for conn in stale:
            conn.close()
        if found is None:
            found = self._open()
            try:
                found.execute("PRAGMA foreign_keys=ON")
            except BaseException:
                found.close()
                raise
        return found, identity, generation

    def checkin(
        self,
        conn: sqlite3.Connection,
        identity: _FileIdentity | None,
        generation: int,
        *,
        reusable: bool,
    ) -> None:
        if reusable and identity is not None and not conn.in_transaction:
            with self._lock:
                if (
                    self._pid == os.getpid()
                    and generation == self._generation
                    and len(self._idle) < SQLITE_IDLE_CONNECTIONS
                ):
                    self._idle.append((conn, identity))
                    return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._forget_if_forked()
            idle = [conn for conn, _ in self._idle]
            self._idle.clear()
            self._generation += 1
        for conn in idle:
            conn.close()

    def _forget_if_forked(self) -> None:
        """In a forked child, drop the parent's connections unused (SQLite forbids using a
        connection across fork); called under the lock."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._idle = []
            self._generation += 1


class SqliteDatabase(Database):
    dialect: Dialect = "sqlite"
    quick_reads = True

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            # Create owner-only before SQLite writes anything into it.
            fd = os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
        db = self._open()
        try:
            # WAL: the CLI can add users while the gateway reads, without "database is locked".
            db.execute("PRAGMA journal_mode=WAL")
        finally:
            db.close()
        self._pool = _SqlitePool(self.path, self._open)

    def _open(self) -> sqlite3.Connection:
        # check_same_thread=False: the pool hands a connection to one thread at a time.
        return sqlite3.connect(
            self.path, timeout=10.0, isolation_level=None, check_same_thread=False
        )

    @contextmanager
    def transaction(self, *, write: bool = False) -> Iterator[Transaction]:
        db, identity, generation = self._pool.checkout()
        clean = False
        try:
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield cast(Transaction, db)
            except BaseException as e:
                db.execute("ROLLBACK")
                # A domain error (user exists, ...) leaves the connection as good as new; a
                # database error may not: it is closed.
                clean = not isinstance(e, sqlite3.Error)
                raise
            else:
                db.execute("COMMIT")
                if write:
                    # Into the main file and the WAL emptied, as closing the last connection
                    # did: the file at rest is the whole database, and a file put in its place
                    # is never read through this one's WAL.
                    db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                clean = True
        finally:
            self._pool.checkin(db, identity, generation, reusable=clean)

    def query_one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        # Without BEGIN/COMMIT: one statement reads one snapshot on its own, and two fewer
        # statements matter on the request path (the key check). `fetchall` runs the statement
        # to its end, so it holds no read lock on the WAL after this returns.
        db, identity, generation = self._pool.checkout()
        clean = False
        try:
            rows = db.execute(sql, params).fetchall()
            clean = True
        finally:
            self._pool.checkin(db, identity, generation, reusable=clean)
        return rows[0] if rows else None

    def describe(self) -> str:
        return f"SQLite file {self.path}"

    def close(self) -> None:
        """Close the idle connections (used again, the database opens new ones)."""
        self._pool.close()


class _PgTransaction:
    """psycopg with the `?` placeholders of the shared SQL."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Result:
        result: Result = self._conn.execute(_pg_sql(sql), tuple(params))
        return result


def _pg_sql(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s")


class PostgresDatabase(Database):
    dialect: Dialect = "postgresql"

    def __init__(self, url: str, *, pool_size: int = 10, connect_timeout_s: float = 10.0) -> None:
        if not is_postgres_url(url):
            raise ValueError(f"not a postgresql:// URL: {redact_url(url)!r}")
        import psycopg_pool  # imported here: SQLite deployments never load the driver

        self.url = url
        self._wait_for_server(connect_timeout_s)
        self._pool = psycopg_pool.ConnectionPool(
            url,
            min_size=1,
            max_size=max(1, pool_size),
            timeout=connect_timeout_s,
            open=False,
            name="fedpersona",
            kwargs={"connect_timeout": max(1, round(connect_timeout_s)), "autocommit": True},
            check=psycopg_pool.ConnectionPool.check_connection,
        )
        try:
            self._pool.open(wait=True, timeout=connect_timeout_s)
        except psycopg_pool.PoolTimeout as e:
            self._pool.close()
            raise DatabaseUnavailable(
                f"cannot connect to {self.describe()} within {connect_timeout_s:g} s"
            ) from e

    def _wait_for_server(self, timeout_s: float) -> None:
        """Connect once, retrying for `timeout_s` (a database starting next to the gateway);
        `DatabaseUnavailable` with the server's reason (password removed) after that."""
        import psycopg

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                psycopg.connect(self.url, connect_timeout=max(1, round(timeout_s))).close()
                return
            except psycopg.OperationalError as e:
                if time.monotonic() >= deadline:
                    raise DatabaseUnavailable(
                        f"cannot connect to {self.describe()}: {self._reason(e)}"
                    ) from None
            time.sleep(0.5)

    @contextmanager
    def transaction(self, *, write: bool = False) -> Iterator[Transaction]:
        with self._unavailable_as_503(), self._pool.connection() as conn:
            if not write:
                # Reads are single statements (each its own snapshot): no BEGIN/COMMIT
                # round trips on the request path (authentication).
                yield _PgTransaction(conn)
                return
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (REGISTRY_WRITE_LOCK,))
                yield _PgTransaction(conn)

    def statement(self, sql: str, params: Sequence[Any] = ()) -> Any:
        # No registry lock: the statement is atomic on its own. Not waiting for the WAL flush
        # is fine for what uses this (rate-limit counters: a crash may forget a few requests).
        # Pipelined: the four commands cost one round trip.
        with self._unavailable_as_503(), self._pool.connection() as conn:
            with conn.pipeline():
                conn.execute("BEGIN")
                conn.execute("SET LOCAL synchronous_commit TO OFF")
                cursor = conn.execute(_pg_sql(sql), tuple(params))
                conn.execute("COMMIT")
            return cursor.fetchone()

    def _reason(self, error: Exception) -> str:
        """The driver's message on one line, without the password."""
        reason = " ".join(str(error).split()) or type(error).__name__
        password = urlsplit(self.url).password
        return reason.replace(password, "***") if password else reason

    @contextmanager
    def _unavailable_as_503(self) -> Iterator[None]:
        import psycopg
        import psycopg_pool

        try:
            yield
        except (psycopg_pool.PoolTimeout, psycopg.OperationalError) as e:
            logger.warning("%s did not answer: %s", self.describe(), self._reason(e))
            raise RegistryUnavailable() from None

    def describe(self) -> str:
        return f"PostgreSQL {redact_url(self.url)}"

    def close(self) -> None:
        self._pool.close()


def open_database(
    location: Path | str, *, pool_size: int = 10, connect_timeout_s: float = 10.0
) -> Database:
    """A `postgresql://` URL opens PostgreSQL; anything else is a SQLite file path."""
    if is_postgres_url(location):
        return PostgresDatabase(
            str(location), pool_size=pool_size, connect_timeout_s=connect_timeout_s
        )
    return SqliteDatabase(Path(location))
