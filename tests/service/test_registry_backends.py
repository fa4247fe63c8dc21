"""The registry contract on both databases (SQLite file, real PostgreSQL server), and migrations.

Every test taking `registry` runs twice: on a SQLite file and on a fresh database of the
session's PostgreSQL server (`tests/support/postgres.py`, started by the suite itself).
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from fedpersona.service.db import (
    REGISTRY_WRITE_LOCK,
    Database,
    DatabaseUnavailable,
    PostgresDatabase,
    SqliteDatabase,
    open_database,
    redact_url,
)
from fedpersona.service.db_migrations import MIGRATIONS, SchemaTooNew, migrate, schema_version
from fedpersona.service.errors import BadRequest, Conflict
from fedpersona.service.registry import (
    SCHEMA_VERSION,
    KeyNotFound,
    NameDeleted,
    Registry,
    UserExists,
    UserNotFound,
)
from support.postgres import PostgresServer

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    if request.param == "sqlite":
        return tmp_path / "registry.sqlite"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def registry(location: Path | str) -> Iterator[Registry]:
    opened = Registry(location)
    yield opened
    opened.close()


def test_users_lifecycle(registry: Registry) -> None:
    before = time.time()
    alice = registry.create_user("alice", proxy_alpha=0.5)
    assert alice.user_id.startswith("u") and alice.proxy_alpha == 0.5
    # Timestamps keep sub-millisecond precision (DOUBLE PRECISION, not PostgreSQL's 4-byte REAL).
    assert abs(registry.get_user("alice").created_at - alice.created_at) < 1e-5
    assert before <= alice.created_at <= time.time()
    registry.create_user("bob-2")
    registry.create_user("bob_1")
    registry.create_user("carol")
    assert [u.name for u in registry.list_users()] == ["alice", "bob-2", "bob_1", "carol"]
    with pytest.raises(UserExists):
        registry.create_user("alice")
    with pytest.raises(BadRequest):
        registry.create_user("../etc")
    with pytest.raises(UserNotFound):
        registry.get_user("nobody")
    assert registry.set_proxy_alpha("alice", 2.0).proxy_alpha == 2.0
    with pytest.raises(BadRequest):
        registry.set_proxy_alpha("alice", float("nan"))
    with pytest.raises(UserNotFound):
        registry.set_proxy_alpha("nobody", 1.0)
    registry.check()


def test_keys_issue_authenticate_revoke(registry: Registry) -> None:
    registry.create_user("alice")
    first, second = registry.issue_key("alice"), registry.issue_key("alice")
    user = registry.authenticate(first.api_key)
    assert user is not None and user.name == "alice" and user.user_id
    assert registry.get_user("alice").active_keys == 2
    assert [k.key_id for k in registry.list_keys("alice")] == [first.key_id, second.key_id]
    assert registry.authenticate(first.api_key[:-1] + "x") is None  # wrong secret
    assert registry.authenticate("garbage") is None
    assert registry.revoke_key(first.key_id).revoked_at is not None
    assert registry.authenticate(first.api_key) is None
    with pytest.raises(Conflict):
        registry.revoke_key(first.key_id)
    with pytest.raises(KeyNotFound):
        registry.revoke_key("0123456789ab")
    assert registry.revoke_user_keys("alice") == 1
    assert registry.authenticate(second.api_key) is None
    assert registry.get_user("alice").active_keys == 0
    with pytest.raises(UserNotFound):
        registry.issue_key("nobody")
    with pytest.raises(UserNotFound):
        registry.revoke_user_keys("nobody")


def test_deleted_names_stay_isolated(registry: Registry) -> None:
    first = registry.create_user("carol")
    old_key = registry.issue_key("carol").api_key
    tombstone = registry.delete_user("carol")
    assert (tombstone.name, tombstone.user_id) == ("carol", first.user_id)
    assert registry.authenticate(old_key) is None  # keys went with the user
    assert registry.list_keys("carol") == []
    assert registry.is_deleted_name("carol")
    with pytest.raises(NameDeleted):
        registry.create_user("carol")
    with pytest.raises(UserNotFound):
        registry.delete_user("carol")
    second = registry.create_user("carol", reuse_deleted_name=True)
    assert second.user_id != first.user_id and not registry.is_deleted_name("carol")
    assert registry.authenticate(old_key) is None  # the old key never comes back
    new_key = registry.issue_key("carol").api_key
    user = registry.authenticate(new_key)
    assert user is not None and user.user_id == second.user_id
    (old,) = registry.deleted("carol")
    assert old.user_id == first.user_id and old.reused_at is not None


def test_concurrent_creates_of_one_name_admit_exactly_one(location: Path | str) -> None:
    # Separate Registry objects: separate connections, as two gateways would have.
    registries = [Registry(location) for _ in range(4)]
    outcomes: list[str] = []
    barrier = threading.Barrier(len(registries))

    def create(r: Registry) -> None:
        barrier.wait()
        try:
            r.create_user("dave")
            outcomes.append("created")
        except UserExists:
            outcomes.append("exists")

    threads = [threading.Thread(target=create, args=(r,)) for r in registries]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(outcomes) == ["created", "exists", "exists", "exists"]
    for r in registries:
        r.close()


# ---- migrations -----------------------------------------------------------------------------


def test_migrations_are_ordered_and_idempotent(location: Path | str) -> None:
    versions = [m.version for m in MIGRATIONS]
    assert versions == list(range(1, len(MIGRATIONS) + 1)) and versions[-1] == SCHEMA_VERSION
    db = open_database(location)
    try:
        assert [m.version for m in migrate(db)] == versions
        assert migrate(db) == [] and schema_version(db) == SCHEMA_VERSION
        with db.transaction() as tx:
            rows = tx.execute("SELECT version, name FROM schema_migrations").fetchall()
        assert sorted(rows) == [(m.version, m.name) for m in MIGRATIONS]
    finally:
        db.close()
    Registry(location).close()  # opening a current database changes nothing
    db = open_database(location)
    try:
        assert migrate(db) == []
    finally:
        db.close()


def test_gateways_starting_together_migrate_once(location: Path | str) -> None:
    databases = [open_database(location) for _ in range(4)]
    applied: list[int] = []
    barrier = threading.Barrier(len(databases))

    def start(db: Database) -> None:
        barrier.wait()
        applied.append(len(migrate(db)))

    threads = [threading.Thread(target=start, args=(db,)) for db in databases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(applied) == [0, 0, 0, len(MIGRATIONS)]
    for db in databases:
        db.close()


def test_a_newer_schema_is_refused(location: Path | str) -> None:
    Registry(location).close()
    db = open_database(location)
    with db.transaction(write=True) as tx:
        tx.execute(
            "INSERT INTO schema_migrations(version, name, applied_at) VALUES (?, ?, ?)",
            (SCHEMA_VERSION + 1, "from the future", time.time()),
        )
    db.close()
    with pytest.raises(SchemaTooNew, match=f"schema version {SCHEMA_VERSION + 1}"):
        Registry(location)


# The schema a version-2 registry file has on disk (the release before schema_migrations).
_VERSION_2_FILE = """
CREATE TABLE users (
    name        TEXT PRIMARY KEY,
    created_at  REAL NOT NULL,
    proxy_alpha REAL NOT NULL DEFAULT 1.0,
    user_id     TEXT
);
CREATE TABLE api_keys (
    key_id      TEXT PRIMARY KEY,
    user        TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    key_sha256  BLOB NOT NULL,
    created_at  REAL NOT NULL,
    revoked_at  REAL
);
CREATE INDEX api_keys_user ON api_keys(user);
CREATE TABLE deleted_users (
    user_id     TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    created_at  REAL NOT NULL,
    deleted_at  REAL NOT NULL,
    reused_at   REAL
);
CREATE INDEX deleted_users_name ON deleted_users(name);
CREATE UNIQUE INDEX users_user_id ON users(user_id);
PRAGMA user_version = 2;
"""


def test_a_version_2_sqlite_file_upgrades_keeping_everything(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite"
    key = "fp-0123456789ab_" + "k" * 43
    with sqlite3.connect(path) as db:
        db.executescript(_VERSION_2_FILE)
        db.execute("INSERT INTO users VALUES ('alice', 1.0, 0.5, 'u00aa'), ('bob', 2.0, 1, 'ub')")
        db.execute(
            "INSERT INTO api_keys VALUES ('0123456789ab', 'alice', ?, 1.0, NULL)",
            (hashlib.sha256(key.encode()).digest(),),
        )
        db.execute("INSERT INTO deleted_users VALUES ('uold', 'carol', 0.5, 0.7, NULL)")
    db.close()

    registry = Registry(path)
    alice = registry.authenticate(key)
    assert alice is not None and (alice.user_id, alice.proxy_alpha) == ("u00aa", 0.5)
    assert [(u.name, u.user_id) for u in registry.list_users()] == [
        ("alice", "u00aa"),
        ("bob", "ub"),
    ]
    with pytest.raises(NameDeleted):
        registry.create_user("carol")
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        history = db.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
        assert [v for (v,) in history] == [m.version for m in MIGRATIONS]
        assert db.execute("SELECT count(*) FROM rate_limits").fetchone()[0] == 0
    db.close()
    assert migrate(registry.database) == []


# ---- PostgreSQL specifics -------------------------------------------------------------------


def test_postgres_url_password_never_shown(postgres_server: PostgresServer) -> None:
    url = postgres_server.url("no_such_database")
    assert postgres_server.password not in redact_url(url)
    with pytest.raises(DatabaseUnavailable, match="no_such_database") as failed:
        open_database(url, connect_timeout_s=0.5).close()
    assert postgres_server.password not in str(failed.value)
    assert "***@127.0.0.1" in str(failed.value)


def test_postgres_stores_in_the_server_not_on_disk(postgres_url: str, tmp_path: Path) -> None:
    registry = Registry(postgres_url)
    assert registry.path is None
    registry.create_user("alice")
    with psycopg.connect(postgres_url) as conn:
        (count,) = conn.execute("SELECT count(*) FROM users").fetchone() or (0,)
        (types,) = conn.execute(
            "SELECT string_agg(data_type, ',') FROM information_schema.columns "
            "WHERE table_name = 'users' AND column_name = 'created_at'"
        ).fetchone() or ("",)
    assert count == 1 and types == "double precision"
    registry.close()


def test_a_database_restart_costs_no_failed_request(postgres_server: PostgresServer) -> None:
    # Pooled connections die with the server; each is checked before use and replaced.
    registry = Registry(postgres_server.new_database(), pool_size=3)
    registry.create_user("alice")
    key = registry.issue_key("alice").api_key
    for _ in range(3):
        assert registry.authenticate(key) is not None
    postgres_server.restart()
    for _ in range(6):
        assert registry.authenticate(key) is not None
    registry.check()
    registry.close()


def test_missing_postgresql_binaries_fail_the_run_instead_of_skipping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from support import postgres

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(postgres, "DEBIAN_ROOT", tmp_path)
    with pytest.raises(pytest.fail.Exception, match="apt-get install -y postgresql"):
        postgres.require_binaries()


# ---- ordering a user's files against deleting them ----------------------------------------------


def _registry_writer_excluded(registry: Registry) -> bool:
    """Whether another session trying to write the registry right now would have to wait."""
    database = registry.database
    if isinstance(database, SqliteDatabase):
        probe = sqlite3.connect(database.path, timeout=0, isolation_level=None)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.execute("ROLLBACK")
            return False
        except sqlite3.OperationalError as e:
            return "locked" in str(e)
        finally:
            probe.close()
    assert isinstance(database, PostgresDatabase)
    with psycopg.connect(database.url, autocommit=True) as conn:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (REGISTRY_WRITE_LOCK,)).fetchone()
        assert row is not None
        if row[0]:
            conn.execute("SELECT pg_advisory_unlock(%s)", (REGISTRY_WRITE_LOCK,))
        return not row[0]


def test_while_user_exists_holds_off_deletes_not_reads(registry: Registry) -> None:
    registry.create_user("carol")
    key = registry.issue_key("carol").api_key
    assert not _registry_writer_excluded(registry)
    seen: list[object] = []
    with registry.while_user_exists("carol"):
        assert _registry_writer_excluded(registry)  # delete_user (any writer) waits for us
        reader = threading.Thread(target=lambda: seen.append(registry.authenticate(key)))
        reader.start()
        reader.join(timeout=60)  # reads are not held off
        assert not reader.is_alive() and seen and seen[0] is not None
    assert not _registry_writer_excluded(registry)
    registry.delete_user("carol")
    with pytest.raises(UserNotFound), registry.while_user_exists("carol"):
        pytest.fail("the block must not run for a deleted user")
    with pytest.raises(UserNotFound), registry.while_user_exists("nobody"):
        pytest.fail("the block must not run for an unknown user")
    registry.create_user("dave")
    with pytest.raises(OSError, match="disk full"), registry.while_user_exists("dave"):
        raise OSError("disk full")  # a failed file write: propagated, the lock released
    assert not _registry_writer_excluded(registry)
