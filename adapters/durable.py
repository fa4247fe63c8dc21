"""Durable file operations: fsync files and directories, replace a file atomically.

Crash safety in the store rests on two POSIX facts: `rename` within one file system is atomic,
and data (or a directory entry) survives a crash only once it (or its directory) is fsynced.
Knows nothing about adapters.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_json_atomic(
    path: Path,
    data: dict[str, Any],
    *,
    indent: int | None = None,
    sort_keys: bool = False,
    before_replace: Callable[[], None] | None = None,
) -> None:
    """Replace `path` with `data` as JSON: readers see the old file or the new one, whole.

    The new file is written and fsynced under a temporary name (`.<name>.<random>.tmp`, in the
    same directory), renamed over `path`, and the directory is fsynced. `before_replace` runs
    just before the rename (a test hook).
    """
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=indent, sort_keys=sort_keys)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def ensure_dir(path: Path) -> None:
    """Create `path` (and parents) durably: each new entry's parent directory is fsynced."""
    if path.is_dir():
        return
    ensure_dir(path.parent)
    with contextlib.suppress(FileExistsError):
        path.mkdir()
    fsync_dir(path.parent)


def fsync_file(path: Path) -> None:
    """Flush `path`'s data to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush `path`'s directory entries (files created, renamed or removed in it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
