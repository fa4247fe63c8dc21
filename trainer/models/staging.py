"""Putting a model directory in place whole: build in a staging dir, fsync, rename under a lock.

Every model writer (`basemodel.build_models`, `importer.import_model`, `proxy.derive_small`)
builds into a staging directory beside the target and swaps it in with renames on the same file
system, so a reader never sees a half-written model and a crash leaves the old one (or none).
Knows nothing about what is inside the directories.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive `flock` on `path` (created if missing) for the duration of the block."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under `root`, so a rename never publishes lost data."""
    for path in [*sorted(root.rglob("*"), reverse=True), root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def swap_in(new: Path, target: Path) -> None:
    """Replace `target` by `new` with renames (same file system), never a partial copy."""
    old = target.with_name(f".old-{target.name}-{uuid.uuid4().hex}")
    if target.exists():
        os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)
