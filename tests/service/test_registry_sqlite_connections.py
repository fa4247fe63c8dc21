"""The SQLite registry keeps its connections open, and still behaves as if it opened each time.

`fedpersona.service.db` pools SQLite connections per process (a key check is a query, not an
open) and reuses one only while the file is the one it was opened on. Here, on real files: key
checks stop opening connections; many threads share the pool; a file deleted, replaced (by
another file, or overwritten in place) or made unwritable is seen exactly as a fresh open sees
it; every write is in the main file at rest (a plain copy of it is complete); a forked child
never touches its parent's connections.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fedpersona.service.db import SQLITE_IDLE_CONNECTIONS, SqliteDatabase
from fedpersona.service.registry import Registry, UserExists


@pytest.fixture
def opens(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the connections SQLite databases open from now on (one entry per open)."""
    opened: list[int] = []
    real = SqliteDatabase._open

    def counting(self: SqliteDatabase) -> sqlite3.Connection:
        opened.append(threading.get_ident())
        return real(self)

    monkeypatch.setattr(SqliteDatabase, "_open", counting)
    return opened


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "home" / "registry.sqlite"


@pytest.fixture
def registry(path: Path, opens: list[int]) -> Iterator[Registry]:
    opened = Registry(path)
    opened.create_user("alice")
    yield opened
    opened.close()


def _key(registry: Registry, user: str = "alice") -> str:
    return registry.issue_key(user).api_key


def test_key_checks_reuse_open_connections(registry: Registry, opens: list[int]) -> None:
    key = _key(registry)
    assert registry.authenticate(key) is not None
    before = len(opens)
    for _ in range(50):
        assert registry.authenticate(key) is not None
        registry.check()
    assert len(opens) == before  # one thread: the one pooled connection, again and again


def test_many_threads_share_the_pool_with_admin_writes(
    registry: Registry, opens: list[int]
) -> None:
    key = _key(registry)
    errors: list[BaseException] = []
    created: list[str] = []
    barrier = threading.Barrier(16)

    def work(i: int) -> None:
        try:
            barrier.wait()
            for round_ in range(20):
                assert registry.authenticate(key) is not None
                if round_ % 5 == 0:
                    name = f"user{i}x{round_}"
                    registry.create_user(name)
                    assert registry.authenticate(_key(registry, name)) is not None
                    created.append(name)
            with pytest.raises(UserExists):  # a domain error inside a write transaction
                registry.create_user("alice")
        except BaseException as e:  # reported below, with the thread's own traceback
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    names = {u.name for u in registry.list_users()}
    assert set(created) <= names and len(created) == 16 * 4
    pool = registry.database._pool  # type: ignore[union-attr]
    assert len(pool._idle) <= SQLITE_IDLE_CONNECTIONS  # idle ones bounded, extras closed


def test_a_deleted_file_fails_as_a_fresh_open_does(registry: Registry, path: Path) -> None:
    key = _key(registry)
    assert registry.authenticate(key) is not None
    path.unlink()
    # SQLite creates an empty file at the path, which has no tables: as before the pool, every
    # operation fails (the gateway answers 500, /ready 503) instead of serving the deleted data.
    with pytest.raises(sqlite3.OperationalError, match="no such table: api_keys"):
        registry.authenticate(key)
    with pytest.raises(sqlite3.OperationalError, match="no such table: users"):
        registry.check()
    with pytest.raises(sqlite3.OperationalError, match="no such table: users"):
        registry.create_user("bob")


@pytest.mark.parametrize("how", ["renamed over", "overwritten in place"])
def test_a_replaced_file_is_read_not_the_one_that_was_open(
    registry: Registry, path: Path, how: str
) -> None:
    key = _key(registry)
    assert registry.authenticate(key) is not None
    other = Registry(path.parent / "other.sqlite")  # e.g. a backup being restored
    other.create_user("zed")
    zed_key = _key(other, "zed")
    other.close()
    if how == "renamed over":
        os.replace(path.parent / "other.sqlite", path)
    else:
        with open(path, "r+b") as f:
            f.write((path.parent / "other.sqlite").read_bytes())
            f.truncate()
    assert registry.authenticate(key) is None  # alice's key is not in the new file
    user = registry.authenticate(zed_key)
    assert user is not None and user.name == "zed"
    assert [u.name for u in registry.list_users()] == ["zed"]
    registry.create_user("bob")
    assert [u.name for u in Registry(path).list_users()] == ["bob", "zed"]


def _make_unwritable(path: Path) -> None:
    if os.geteuid() != 0:
        path.chmod(0o400)
        return
    if shutil.which("chattr") is None:
        pytest.skip("running as root without chattr: no way to make a file unwritable")
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"running as root and chattr +i refused: {done.stderr.decode().strip()}")


def test_a_file_made_unwritable_refuses_writes_and_serves_reads(
    registry: Registry, path: Path
) -> None:
    key = _key(registry)
    assert registry.authenticate(key) is not None  # a writable connection is pooled now
    _make_unwritable(path)
    try:
        # As a fresh open: reads go on, writes fail (the pooled writable one is not reused).
        assert registry.authenticate(key) is not None
        with pytest.raises(sqlite3.OperationalError, match="readonly database"):
            registry.create_user("bob")
        with pytest.raises(sqlite3.OperationalError, match="readonly database"):
            registry.revoke_user_keys("alice")
        assert registry.authenticate(key) is not None
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(path)], check=False)
        path.chmod(0o600)
    registry.create_user("bob")  # writable again: writes work again


def test_a_change_of_the_files_metadata_opens_afresh(
    registry: Registry, path: Path, opens: list[int]
) -> None:
    key = _key(registry)
    assert registry.authenticate(key) is not None
    before = len(opens)
    path.chmod(0o640)  # any metadata change (chmod, chown, chattr) alters the change time
    assert registry.authenticate(key) is not None
    assert len(opens) == before + 1
    assert registry.authenticate(key) is not None
    assert len(opens) == before + 1  # and the new connection is pooled in turn


def test_every_write_is_in_the_main_file_at_rest(
    registry: Registry, path: Path, tmp_path: Path
) -> None:
    key = _key(registry)
    registry.create_user("bob")
    registry.revoke_user_keys("alice")
    assert (path.parent / "registry.sqlite-wal").stat().st_size == 0  # the WAL is empty
    copy = tmp_path / "copy" / "registry.sqlite"
    copy.parent.mkdir()
    shutil.copyfile(path, copy)  # a plain copy of the main file, as a backup script would
    copied = Registry(copy)
    assert [u.name for u in copied.list_users()] == ["alice", "bob"]
    assert copied.authenticate(key) is None  # the revocation is in it too
    copied.close()


def test_key_checks_leave_no_read_open_on_pooled_connections(
    registry: Registry, path: Path
) -> None:
    # A key check is one statement without BEGIN/COMMIT: run to its end, it holds no snapshot,
    # so a write right after it still empties the WAL into the main file.
    key = _key(registry)
    for _ in range(3):
        assert registry.authenticate(key) is not None
        assert registry.authenticate("fp-000000000000_nope") is None
    registry.create_user("bob")
    assert (path.parent / "registry.sqlite-wal").stat().st_size == 0
    registry.revoke_user_keys("alice")
    assert registry.authenticate(key) is None  # and it reads the write at once


def test_a_database_error_drops_the_connection(registry: Registry, opens: list[int]) -> None:
    database = registry.database
    registry.check()
    before = len(opens)
    with pytest.raises(sqlite3.OperationalError), database.transaction() as tx:
        tx.execute("SELECT * FROM no_such_table")
    registry.check()
    assert len(opens) == before + 1  # the failed one was closed, not pooled
    with pytest.raises(UserExists):  # a domain error: the connection was fine, it is reused
        registry.create_user("alice")
    registry.check()
    assert len(opens) == before + 1


def test_close_releases_idle_connections_and_sqlite_opens_again(
    registry: Registry, opens: list[int]
) -> None:
    key = _key(registry)
    assert registry.authenticate(key) is not None
    pool = registry.database._pool  # type: ignore[union-attr]
    assert pool._idle
    registry.close()
    assert not pool._idle
    before = len(opens)
    assert registry.authenticate(key) is not None  # as before the pool: usable after close
    assert len(opens) == before + 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX only")
def test_a_forked_child_never_uses_its_parents_connections(registry: Registry) -> None:
    key = _key(registry)
    assert registry.authenticate(key) is not None
    pool = registry.database._pool  # type: ignore[union-attr]
    parents = {id(conn) for conn, _ in pool._idle}
    assert parents
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, never return into pytest
        code = 1
        try:
            conn, _, _ = pool.checkout()
            ok = id(conn) not in parents and registry.authenticate(key) is not None
            code = 0 if ok else 2
        finally:
            os.write(write, bytes([code]))
            os._exit(0)
    os.close(write)
    answer = os.read(read, 1)
    os.close(read)
    os.waitpid(pid, 0)
    assert answer == b"\x00"  # the child opened its own connection and read the registry
    assert registry.authenticate(key) is not None  # the parent's pool is untouched
