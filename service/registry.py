"""Users and API-key hashes: the gateway's only own state, in SQLite or a shared PostgreSQL.

The database (`fedpersona.service.db`) is an embedded SQLite file by default and a PostgreSQL
server when `database_url` is set (several gateways on several nodes); the schema and its
migrations are owned by `fedpersona.service.db_migrations`, applied when a registry opens.

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

Each user row carries an immutable `user_id` (random, never reused) next to its name. Deleting a
user leaves a tombstone in `deleted_users` (name, user id, created and deleted times), and a
tombstoned name cannot be created again unless the operator asks for it explicitly
(`reuse_deleted_name`), after the store and silo of the name were cleared
(`fedpersona.service.accounts` does both steps): a new person must never be served what was
trained for the old one. Databases of an older schema are upgraded in place when opened.

The proxy-tuning alpha's accepted range and its check live here too (`check_proxy_alpha`,
`ProxyAlpha` for wire models), so the CLI and the admin API refuse the same values with the
same words.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

from fedpersona.adapters import InvalidName, validate_user_id
from fedpersona.adapters.names import NAME_RULE
from fedpersona.service.db import Database, SqliteDatabase, Transaction, open_database
from fedpersona.service.db_migrations import SCHEMA_VERSION as SCHEMA_VERSION
from fedpersona.service.db_migrations import migrate
from fedpersona.service.db_migrations import new_user_id as new_user_id
from fedpersona.service.errors import BadRequest, Conflict, NotFound
from pydantic import AfterValidator, WithJsonSchema
from pydantic_core import PydanticCustomError

KEY_PREFIX = "fp-"
_KEY_ID_HEX = 12
PROXY_ALPHA_MIN = 0.0
PROXY_ALPHA_MAX = 10.0


@dataclass(frozen=True)
class User:
    name: str
    created_at: float
    proxy_alpha: float
    active_keys: int = 0
    user_id: str = ""  # immutable, never reused: tells a re-created name's owner apart


@dataclass(frozen=True)
class Tombstone:
    """A deleted user: their name stays refused until an operator reuses it on purpose."""

    name: str
    user_id: str
    created_at: float
    deleted_at: float
    reused_at: float | None = None


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


class NameDeleted(Conflict):
    """The name belonged to a deleted user; reusing it needs the explicit override."""

    code = "user_name_deleted"
    default_message = "This user name belonged to a deleted user."


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


def proxy_alpha_problem(value: object) -> str | None:
    """Why `value` is not an accepted proxy alpha (a sentence without a subject), or None."""
    accepted = f"a number from {PROXY_ALPHA_MIN:g} to {PROXY_ALPHA_MAX:g}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"must be {accepted}"
    if not math.isfinite(value) or not PROXY_ALPHA_MIN <= value <= PROXY_ALPHA_MAX:
        return f"must be {accepted}, got {value:g}"
    return None


def check_proxy_alpha(value: float, *, field: str = "proxy_alpha") -> float:
    """`value` as a float if it is an accepted proxy alpha, else `BadRequest` naming `field`."""
    problem = proxy_alpha_problem(value)
    if problem is not None:
        raise BadRequest(f"{field} {problem}", param=field)
    return float(value)


def _wire_alpha(value: float) -> float:
    problem = proxy_alpha_problem(value)
    if problem is not None:
        raise PydanticCustomError("proxy_alpha", problem)
    return value


# The proxy alpha in wire models: the same check and words as the CLI; the schema shows the range.
ProxyAlpha = Annotated[
    float,
    AfterValidator(_wire_alpha),
    WithJsonSchema({"type": "number", "minimum": PROXY_ALPHA_MIN, "maximum": PROXY_ALPHA_MAX}),
]


def check_user_name(name: str) -> str:
    try:
        validate_user_id(name)
    except InvalidName as e:
        shown = repr(name) if isinstance(name, str) else type(name).__name__
        raise BadRequest(f"invalid user name {shown}: use {NAME_RULE}", param="name") from e
    return name


class Registry:
    """Thread-safe: one transaction per operation (see `fedpersona.service.db`).

    `location` is a SQLite file path, a `postgresql://` URL, or an open `Database` (which the
    registry then owns and closes).
    """

    def __init__(
        self,
        location: Path | str | Database,
        *,
        default_alpha: float = 1.0,
        pool_size: int = 10,
    ) -> None:
        self.default_alpha = default_alpha
        self.database = (
            location
            if isinstance(location, Database)
            else open_database(location, pool_size=pool_size)
        )
        # The SQLite file (None on PostgreSQL).
        self.path: Path | None = (
            self.database.path if isinstance(self.database, SqliteDatabase) else None
        )
        try:
            migrate(self.database)
        except BaseException:
            self.database.close()
            raise

    def _connect(self, *, write: bool = False) -> AbstractContextManager[Transaction]:
        return self.database.transaction(write=write)

    def close(self) -> None:
        """Release the database's pooled connections (SQLite opens new ones if used again)."""
        self.database.close()

    # ---- users ----------------------------------------------------------------------------

    def create_user(
        self, name: str, *, proxy_alpha: float | None = None, reuse_deleted_name: bool = False
    ) -> User:
        """Create `name`; a deleted user's name only with `reuse_deleted_name` (`NameDeleted`).

        Reusing a name marks its tombstones as reused; clearing what the old user left in the
        store and silos is the caller's part (`fedpersona.service.accounts.create_user`).
        """
        check_user_name(name)
        alpha = check_proxy_alpha(self.default_alpha if proxy_alpha is None else proxy_alpha)
        now = time.time()
        user_id = new_user_id()
        with self._connect(write=True) as db:
            if db.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone() is not None:
                raise UserExists()
            tombstone = db.execute(
                "SELECT deleted_at FROM deleted_users WHERE name = ? AND reused_at IS NULL "
                "ORDER BY deleted_at DESC",
                (name,),
            ).fetchone()
            if tombstone is not None and not reuse_deleted_name:
                raise NameDeleted(_deleted_message(name, tombstone[0]), param="name")
            if tombstone is not None:
                db.execute(
                    "UPDATE deleted_users SET reused_at = ? WHERE name = ? AND reused_at IS NULL",
                    (now, name),
                )
            db.execute(
                "INSERT INTO users(name, created_at, proxy_alpha, user_id) VALUES (?, ?, ?, ?)",
                (name, now, alpha, user_id),
            )
        return User(name=name, created_at=now, proxy_alpha=alpha, user_id=user_id)

    def deleted(self, name: str | None = None) -> list[Tombstone]:
        """Tombstones of deleted users (of `name` only, if given), oldest first."""
        query = "SELECT name, user_id, created_at, deleted_at, reused_at FROM deleted_users"
        params: tuple[str, ...] = ()
        if name is not None:
            query += " WHERE name = ?"
            params = (name,)
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY deleted_at", params).fetchall()
        return [Tombstone(*row) for row in rows]

    def is_deleted_name(self, name: str) -> bool:
        """Whether `name` belonged to a deleted user and was not reused since."""
        return any(t.reused_at is None for t in self.deleted(name))

    def get_user(self, name: str) -> User:
        with self._connect() as db:
            row = db.execute(_USER_SELECT + " WHERE u.name = ? GROUP BY u.name", (name,)).fetchone()
        if row is None:
            raise UserNotFound()
        return User(*row)

    def list_users(self) -> list[User]:
        with self._connect() as db:
            rows = db.execute(_USER_SELECT + " GROUP BY u.name").fetchall()
        # Sorted here: database collations order names differently.
        return sorted((User(*row) for row in rows), key=lambda u: u.name)

    def set_proxy_alpha(self, name: str, alpha: float) -> User:
        alpha = check_proxy_alpha(alpha)
        with self._connect(write=True) as db:
            cur = db.execute("UPDATE users SET proxy_alpha = ? WHERE name = ?", (alpha, name))
            if cur.rowcount == 0:
                raise UserNotFound()
        return self.get_user(name)

    @contextmanager
    def while_user_exists(self, name: str) -> Iterator[None]:
        """Run the block under the registry's write lock, `name` present (else `UserNotFound`).

        For what is kept about a user outside the database (their preferences file): a write in
        the block happens wholly before or wholly after a concurrent `delete_user` (in any
        process), never between its tombstone and the quarantine of their store directory that
        follows it, so a deleted user keeps nothing. Keep the block short: other admin writes
        wait for it (reads do not).
        """
        with self._connect(write=True) as db:
            if db.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone() is None:
                raise UserNotFound()
            yield

    def delete_user(self, name: str) -> Tombstone:
        """Remove the user and all their keys, and tombstone the name (see the module doc).

        Their adapters in the store are not touched here: `fedpersona.service.accounts`
        quarantines them.
        """
        now = time.time()
        with self._connect(write=True) as db:
            row = db.execute(
                "SELECT user_id, created_at FROM users WHERE name = ?", (name,)
            ).fetchone()
            if row is None:
                raise UserNotFound()
            user_id, created_at = row
            db.execute(
                "INSERT INTO deleted_users(user_id, name, created_at, deleted_at) "
                "VALUES (?, ?, ?, ?)",
                (user_id, name, created_at, now),
            )
            db.execute("DELETE FROM users WHERE name = ?", (name,))
        return Tombstone(name=name, user_id=user_id, created_at=created_at, deleted_at=now)

    # ---- keys -----------------------------------------------------------------------------

    def issue_key(self, user: str) -> IssuedKey:
        key_id, api_key = new_api_key()
        with self._connect(write=True) as db:
            if db.execute("SELECT 1 FROM users WHERE name = ?", (user,)).fetchone() is None:
                raise UserNotFound()
            db.execute(
                'INSERT INTO api_keys(key_id, "user", key_sha256, created_at) VALUES (?, ?, ?, ?)',
                (key_id, user, _digest(api_key), time.time()),
            )
        return IssuedKey(key_id=key_id, user=user, api_key=api_key)

    def list_keys(self, user: str | None = None) -> list[KeyInfo]:
        query = 'SELECT key_id, "user", created_at, revoked_at FROM api_keys'
        params: tuple[str, ...] = ()
        if user is not None:
            query += ' WHERE "user" = ?'
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
                'SELECT key_id, "user", created_at, revoked_at FROM api_keys WHERE key_id = ?',
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
                'UPDATE api_keys SET revoked_at = ? WHERE "user" = ? AND revoked_at IS NULL',
                (time.time(), user),
            )
        return cur.rowcount

    def authenticate(self, api_key: str) -> User | None:
        """The user owning an active key, or None. Constant-time in the secret."""
        key_id = parse_key_id(api_key)
        if key_id is None:
            return None
        row = self.database.query_one(
            "SELECT k.key_sha256, u.name, u.created_at, u.proxy_alpha, u.user_id "
            'FROM api_keys k JOIN users u ON u.name = k."user" '
            "WHERE k.key_id = ? AND k.revoked_at IS NULL",
            (key_id,),
        )
        # Compare even when no row matched, so timing does not tell a known key id apart.
        stored = bytes(row[0]) if row is not None else b"\0" * 32
        if not hmac.compare_digest(stored, _digest(api_key)) or row is None:
            return None
        return User(name=row[1], created_at=row[2], proxy_alpha=row[3], user_id=row[4])

    def check(self) -> None:
        """Raise if the database cannot be read (readiness probe)."""
        with self._connect() as db:
            db.execute("SELECT count(*) FROM users").fetchone()


_USER_SELECT = (
    "SELECT u.name, u.created_at, u.proxy_alpha, "
    "COUNT(CASE WHEN k.key_id IS NOT NULL AND k.revoked_at IS NULL THEN 1 END), u.user_id "
    'FROM users u LEFT JOIN api_keys k ON k."user" = u.name'
)


def _deleted_message(name: str, deleted_at: float) -> str:
    when = datetime.fromtimestamp(deleted_at, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"user name {name!r} belonged to a user deleted on {when}; a deleted name is not given "
        "to someone new, so that nothing trained for the old user reaches them. Choose another "
        "name, or start the name over from a clean slate with reuse_deleted_name "
        "(CLI: --reuse-deleted-name)."
    )
