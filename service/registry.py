"""Users and API-key hashes in an embedded SQLite file (the gateway's only own state).

A key looks like `fp-<key id>_<secret>`: the key id (12 hex chars) is public and names the key
in listings and revocations; the secret has 256 bits of entropy. Only `sha256(full key)` is
stored, and a presented key is checked by looking its row up by key id and comparing digests in
constant time, so neither the raw key nor anything that verifies it offline cheaply is on disk
(a plain hash suffices: the key is random, not a password).

User names are checked with `adapters.validate_user_id`, so a registry user is always a valid
store user. No HTTP framework or route here: failures are the service's domain errors
(`fedpersona.service.errors`: `UserExists` is a `Conflict`, `UserNotFound` and `KeyNotFound`
are `NotFound`s, a bad name is a `BadRequest`), whose one mapping to HTTP statuses lives in that
module; the admin routes return them as they are and `fedpersona users` prints their message.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fedpersona.adapters import InvalidName, validate_user_id
from fedpersona.service.errors import BadRequest, Conflict, NotFound

KEY_PREFIX = "fp-"
_KEY_ID_HEX = 12
_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name        TEXT PRIMARY KEY,
    created_at  REAL NOT NULL,
    proxy_alpha REAL NOT NULL DEFAULT 1.0
);
CREATE TABLE IF NOT EXISTS api_keys (
    key_id      TEXT PRIMARY KEY,
    user        TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    key_sha256  BLOB NOT NULL,
    created_at  REAL NOT NULL,
    revoked_at  REAL
);
CREATE INDEX IF NOT EXISTS api_keys_user ON api_keys(user);
"""


@dataclass(frozen=True)
class User:
    name: str
    created_at: float
    proxy_alpha: float
    active_keys: int = 0


@dataclass(frozen=True)
class KeyInfo:
    key_id: str
    user: str
    created_at: float
    revoked_at: float | None


@dataclass(frozen=True)
class IssuedKey:
    key_id: str
    user: str
    api_key: str  # the only time the raw key exists outside the client


class UserExists(Conflict):
    default_message = "A user with this name already exists."


class UserNotFound(NotFound):
    default_message = "No such user."


class KeyNotFound(NotFound):
    default_message = "No such API key."


def _digest(api_key: str) -> bytes:
    return hashlib.sha256(api_key.encode("utf-8")).digest()


def parse_key_id(api_key: str) -> str | None:
    """The key id of a well-formed key, or None (no database access for garbage)."""
    if not api_key.startswith(KEY_PREFIX):
        return None
    rest = api_key[len(KEY_PREFIX) :]
    key_id, sep, secret = rest[:_KEY_ID_HEX], rest[_KEY_ID_HEX : _KEY_ID_HEX + 1], rest[13:]
    if sep != "_" or len(secret) < 32 or not all(c in "0123456789abcdef" for c in key_id):
        return None
    return key_id


def new_api_key() -> tuple[str, str]:
    key_id = secrets.token_hex(_KEY_ID_HEX // 2)
    return key_id, f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def check_user_name(name: str) -> str:
    try:
        validate_user_id(name)
    except InvalidName as e:
        raise BadRequest(f"invalid user name: {e}", param="name") from e
    return name


class Registry:
    """Thread-safe by construction: one short-lived connection per operation."""

    def __init__(self, path: Path, *, default_alpha: float = 1.0) -> None:
        self.path = Path(path)
        self.default_alpha = default_alpha
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            # Create owner-only before SQLite writes anything into it.
            fd = os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
        db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
        try:
            # WAL: the CLI can add users while the gateway reads, without "database is locked".
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
        finally:
            db.close()

    @contextmanager
    def _connect(self, *, write: bool = False) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
        try:
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield db
            except Exception:
                db.execute("ROLLBACK")
                raise
            else:
                db.execute("COMMIT")
        finally:
            db.close()

    # ---- users ----------------------------------------------------------------------------

    def create_user(self, name: str, *, proxy_alpha: float | None = None) -> User:
        check_user_name(name)
        alpha = self.default_alpha if proxy_alpha is None else proxy_alpha
        now = time.time()
        with self._connect(write=True) as db:
            try:
                db.execute(
                    "INSERT INTO users(name, created_at, proxy_alpha) VALUES (?, ?, ?)",
                    (name, now, alpha),
                )
            except sqlite3.IntegrityError as e:
                raise UserExists() from e
        return User(name=name, created_at=now, proxy_alpha=alpha)

    def get_user(self, name: str) -> User:
        with self._connect() as db:
            row = db.execute(_USER_SELECT + " WHERE u.name = ? GROUP BY u.name", (name,)).fetchone()
        if row is None:
            raise UserNotFound()
        return User(*row)

    def list_users(self) -> list[User]:
        with self._connect() as db:
            rows = db.execute(_USER_SELECT + " GROUP BY u.name ORDER BY u.name").fetchall()
        return [User(*row) for row in rows]

    def set_proxy_alpha(self, name: str, alpha: float) -> User:
        with self._connect(write=True) as db:
            cur = db.execute("UPDATE users SET proxy_alpha = ? WHERE name = ?", (alpha, name))
            if cur.rowcount == 0:
                raise UserNotFound()
        return self.get_user(name)

    def delete_user(self, name: str) -> None:
        """Remove the user and all their keys (their adapters in the store are left alone)."""
        with self._connect(write=True) as db:
            if db.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount == 0:
                raise UserNotFound()

    # ---- keys -----------------------------------------------------------------------------

    def issue_key(self, user: str) -> IssuedKey:
        key_id, api_key = new_api_key()
        with self._connect(write=True) as db:
            if db.execute("SELECT 1 FROM users WHERE name = ?", (user,)).fetchone() is None:
                raise UserNotFound()
            db.execute(
                "INSERT INTO api_keys(key_id, user, key_sha256, created_at) VALUES (?, ?, ?, ?)",
                (key_id, user, _digest(api_key), time.time()),
            )
        return IssuedKey(key_id=key_id, user=user, api_key=api_key)

    def list_keys(self, user: str | None = None) -> list[KeyInfo]:
        query = "SELECT key_id, user, created_at, revoked_at FROM api_keys"
        params: tuple[str, ...] = ()
        if user is not None:
            query += " WHERE user = ?"
            params = (user,)
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY created_at", params).fetchall()
        return [KeyInfo(*row) for row in rows]

    def revoke_key(self, key_id: str) -> KeyInfo:
        with self._connect(write=True) as db:
            cur = db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                (time.time(), key_id),
            )
            row = db.execute(
                "SELECT key_id, user, created_at, revoked_at FROM api_keys WHERE key_id = ?",
                (key_id,),
            ).fetchone()
        if row is None:
            raise KeyNotFound()
        if cur.rowcount == 0:
            raise Conflict("This API key is already revoked.")
        return KeyInfo(*row)

    def revoke_user_keys(self, user: str) -> int:
        with self._connect(write=True) as db:
            if db.execute("SELECT 1 FROM users WHERE name = ?", (user,)).fetchone() is None:
                raise UserNotFound()
            cur = db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE user = ? AND revoked_at IS NULL",
                (time.time(), user),
            )
        return cur.rowcount

    def authenticate(self, api_key: str) -> User | None:
        """The user owning an active key, or None. Constant-time in the secret."""
        key_id = parse_key_id(api_key)
        if key_id is None:
            return None
        with self._connect() as db:
            row = db.execute(
                "SELECT k.key_sha256, u.name, u.created_at, u.proxy_alpha FROM api_keys k "
                "JOIN users u ON u.name = k.user WHERE k.key_id = ? AND k.revoked_at IS NULL",
                (key_id,),
            ).fetchone()
        # Compare even when no row matched, so timing does not tell a known key id apart.
        stored = row[0] if row is not None else b"\0" * 32
        if not hmac.compare_digest(stored, _digest(api_key)) or row is None:
            return None
        return User(name=row[1], created_at=row[2], proxy_alpha=row[3])

    def check(self) -> None:
        """Raise if the database cannot be read (readiness probe)."""
        with self._connect() as db:
            db.execute("SELECT count(*) FROM users").fetchone()


_USER_SELECT = (
    "SELECT u.name, u.created_at, u.proxy_alpha, "
    "COUNT(CASE WHEN k.key_id IS NOT NULL AND k.revoked_at IS NULL THEN 1 END) "
    "FROM users u LEFT JOIN api_keys k ON k.user = u.name"
)
