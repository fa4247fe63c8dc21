"""`Version`: one published adapter version, the content hash that names it, and its id check.

A version id is 16 lower-case hex digits. It travels outside the store (in vLLM adapter names
and proxy expert references, see `refs.py`), so every reader checks it with `check_version_id`.
Pure: the record format of `version.json` and the id function, no file system access (the store
reads and writes the files).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from fedpersona.adapters.errors import InvalidName, StoreCorrupt
from fedpersona.adapters.names import Slot

VERSION_FILE = "version.json"
ID_LENGTH = 16
_HEX = frozenset("0123456789abcdef")


def is_version_id(value: object) -> bool:
    """True if `value` is a version id: exactly 16 lower-case hex digits."""
    return isinstance(value, str) and len(value) == ID_LENGTH and set(value) <= _HEX


def check_version_id(value: object) -> str:
    """Return `value` if it is a version id, else raise `InvalidName`."""
    if isinstance(value, str) and is_version_id(value):
        return value
    raise InvalidName(f"invalid version id {value!r}: expected {ID_LENGTH} lower-case hex digits")


@dataclass(frozen=True)
class Version:
    """One published, immutable adapter version. `path` is a PEFT directory vLLM can load.

    Hashable; equality ignores `metadata` (a version's metadata never changes anyway).
    """

    slot: Slot
    id: str
    path: Path
    created_at: datetime
    base_model: str
    rank: int
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)
    target_modules: tuple[str, ...] = ()
    seq: int = 0  # publish order within the slot (1, 2, ...)


def content_id(files: dict[str, bytes]) -> str:
    """The version id of a set of files: SHA-256 over (name, length, bytes), sorted by name."""
    digest = hashlib.sha256()
    for name in sorted(files):
        data = files[name]
        digest.update(name.encode("utf-8") + b"\0" + len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()[:ID_LENGTH]


def version_from_record(slot: Slot, path: Path, data: dict[str, Any]) -> Version:
    """The `Version` a `version.json` record describes (`StoreCorrupt` if it is malformed)."""
    try:
        return Version(
            slot=slot,
            id=str(data["id"]),
            path=path,
            created_at=datetime.fromisoformat(data["created_at"]),
            base_model=str(data["base_model"]),
            rank=int(data["rank"]),
            metadata=dict(data.get("metadata") or {}),
            target_modules=tuple(data.get("target_modules") or ()),
            seq=int(data.get("seq", 0)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise StoreCorrupt(f"{path / VERSION_FILE}: malformed: {e}") from e
