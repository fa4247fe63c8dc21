"""The database schema as an ordered list of versioned migrations, applied when a database opens.

The one owner of the tables of `fedpersona.service.db` (users, API keys, tombstones, rate-limit
buckets) on both SQLite and PostgreSQL. `migrate` runs in one transaction under a lock (SQLite:
`BEGIN IMMEDIATE`; PostgreSQL: an advisory lock), so gateways starting together upgrade a shared
database once and the others wait, then find nothing to do. Each migration is written to be
idempotent as well (`IF NOT EXISTS`, column checks), so a half-known history cannot break it.

Applied versions are recorded in `schema_migrations` (version, name, applied_at). SQLite files
written before that table existed carry their version in `PRAGMA user_version` (0 with tables:
version 1; 2: version 2), which is adopted as history; `user_version` is kept equal to the
latest version. A database newer than this code is refused (`SchemaTooNew`): an older gateway
must not write into a schema it does not know.

To change the schema: append a `Migration` with the next version, never edit a released one.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from fedpersona.service.db import (
    MIGRATION_LOCK,
    Database,
    DatabaseError,
    Dialect,
    SqliteDatabase,
    Transaction,
)

_TYPES: dict[Dialect, dict[str, str]] = {
    "sqlite": {"float": "REAL", "bytes": "BLOB"},
    "postgresql": {"float": "DOUBLE PRECISION", "bytes": "BYTEA"},
}


class SchemaTooNew(DatabaseError):
    """The database was migrated by a newer fedpersona than this one."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    apply: Callable[[Transaction, Dialect], None]


def _run(tx: Transaction, dialect: Dialect, script: str) -> None:
    for statement in script.format(**_TYPES[dialect]).split(";"):
        if statement.strip():
            tx.execute(statement)


def _columns(tx: Transaction, dialect: Dialect, table: str) -> set[str]:
    if dialect == "sqlite":
        return {row[1] for row in tx.execute(f"PRAGMA table_info({table})").fetchall()}
    rows = tx.execute(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = ?",
        (table,),
    ).fetchall()
    return {row[0] for row in rows}


def _v1_users_and_keys(tx: Transaction, dialect: Dialect) -> None:
    _run(
        tx,
        dialect,
        """
        CREATE TABLE IF NOT EXISTS users (
            name        TEXT PRIMARY KEY,
            created_at  {float} NOT NULL,
            proxy_alpha {float} NOT NULL DEFAULT 1.0
        );
        CREATE TABLE IF NOT EXISTS api_keys (
            key_id      TEXT PRIMARY KEY,
            "user"      TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
            key_sha256  {bytes} NOT NULL,
            created_at  {float} NOT NULL,
            revoked_at  {float}
        );
        CREATE INDEX IF NOT EXISTS api_keys_user ON api_keys("user");
        """,
    )


def new_user_id() -> str:
    """An immutable user identity: random, never reused."""
    return "u" + secrets.token_hex(8)


def _v2_user_ids_and_tombstones(tx: Transaction, dialect: Dialect) -> None:
    if "user_id" not in _columns(tx, dialect, "users"):
        tx.execute("ALTER TABLE users ADD COLUMN user_id TEXT")
    names = [r[0] for r in tx.execute("SELECT name FROM users WHERE user_id IS NULL").fetchall()]
    for name in names:  # rows of version 1: each gets its own identity now
        tx.execute("UPDATE users SET user_id = ? WHERE name = ?", (new_user_id(), name))
    _run(
        tx,
        dialect,
        """
        CREATE UNIQUE INDEX IF NOT EXISTS users_user_id ON users(user_id);
        CREATE TABLE IF NOT EXISTS deleted_users (
            user_id     TEXT PRIMARY KEY,
            name        TEXT NOT NULL,
            created_at  {float} NOT NULL,
            deleted_at  {float} NOT NULL,
            reused_at   {float}
        );
        CREATE INDEX IF NOT EXISTS deleted_users_name ON deleted_users(name);
        """,
    )


def _v3_rate_limit_buckets(tx: Transaction, dialect: Dialect) -> None:
    # One token bucket per user, shared by every gateway on this database
    # (`fedpersona.service.db_ratelimit`); `granted` is the outcome of the last request.
    _run(
        tx,
        dialect,
        """
        CREATE TABLE IF NOT EXISTS rate_limits (
            bucket      TEXT PRIMARY KEY,
            tokens      {float} NOT NULL,
            updated     {float} NOT NULL,
            granted     INTEGER NOT NULL
        );
        """,
    )


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "users and API keys", _v1_users_and_keys),
    Migration(2, "immutable user ids and tombstones of deleted users", _v2_user_ids_and_tombstones),
    Migration(3, "shared rate-limit buckets", _v3_rate_limit_buckets),
)
SCHEMA_VERSION = MIGRATIONS[-1].version

_HISTORY = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     INTEGER PRIMARY KEY,
    name        TEXT NOT NULL,
    applied_at  {float} NOT NULL
)
"""


def _recorded_version(tx: Transaction, dialect: Dialect) -> int:
    row = tx.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
    if row is not None and row[0] is not None:
        return int(row[0])
    if dialect != "sqlite":
        return 0
    # A file from before `schema_migrations`: its version was PRAGMA user_version, and version
    # 1 did not set it.
    legacy = int(tx.execute("PRAGMA user_version").fetchone()[0])
    if legacy == 0 and _columns(tx, dialect, "users"):
        legacy = 1
    return legacy


def migrate(db: Database) -> list[Migration]:
    """Bring `db` to `SCHEMA_VERSION`; the migrations applied now (empty: it was up to date)."""
    applied: list[Migration] = []
    with db.transaction(write=True) as tx:
        if db.dialect == "postgresql":
            tx.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
        _run(tx, db.dialect, _HISTORY)
        current = _recorded_version(tx, db.dialect)
        if current > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"{db.describe()} has schema version {current}, newer than this fedpersona "
                f"knows ({SCHEMA_VERSION}); upgrade fedpersona before pointing it at this database"
            )
        now = time.time()
        for migration in MIGRATIONS:
            if migration.version <= current:
                # Adopt a legacy SQLite version as history (no-op when already recorded).
                tx.execute(
                    "INSERT INTO schema_migrations(version, name, applied_at) VALUES (?, ?, ?) "
                    "ON CONFLICT (version) DO NOTHING",
                    (migration.version, migration.name, now),
                )
                continue
            migration.apply(tx, db.dialect)
            tx.execute(
                "INSERT INTO schema_migrations(version, name, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.name, now),
            )
            applied.append(migration)
        if isinstance(db, SqliteDatabase):
            tx.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    return applied


def schema_version(db: Database) -> int:
    """The latest version recorded in a migrated `db`."""
    with db.transaction() as tx:
        row = tx.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
    return int(row[0]) if row is not None and row[0] is not None else 0
