"""The store's publish stamp: one small file that every publish replaces, so a reader notices a
publish anywhere in the store with a single `stat`.

    <store>/published.json    {"slot": "<slot path>", "version": "<id>", "at": <unix time>}

Nothing pushes a publish to the gateways (the trainer and the gateways share only the store's
volume), and the per-slot check (`AdapterStore.current_id`, one `stat` of a slot's
`current.json`) costs one call per slot watched. `PublishWatch.changed` costs one call for the
whole store, so a gateway can look every few milliseconds and check its slots only when
something was published.

The stamp is a hint, never the truth: it names only the latest publish (two publishes between
two looks show as one), it is written after `current.json` (a reader that sees it sees the new
version) and its write is best effort (a publish that cannot write it still succeeds, and is
found by the readers' slower per-slot polling). On network filesystems the attribute cache of
the reading client bounds how soon a change is seen, as for `current.json`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from fedpersona.adapters.durable import write_json_atomic
from fedpersona.adapters.errors import InvalidName
from fedpersona.adapters.names import Slot

logger = logging.getLogger(__name__)

STAMP_FILE = "published.json"


def announce(root: Path, slot: Slot, version_id: str) -> None:
    """Record that `slot` now serves `version_id` (after its `current.json` was replaced)."""
    try:
        write_json_atomic(
            root / STAMP_FILE, {"slot": slot.path, "version": version_id, "at": time.time()}
        )
    except OSError as e:  # a hint: the publish itself is complete and stays so
        logger.warning("could not write the publish stamp in %s: %s", root, e)


class PublishWatch:
    """Tells whether anything was published since the last look, with one `stat`."""

    def __init__(self, root: Path) -> None:
        self._path = Path(root) / STAMP_FILE
        self._seen = self._stamp()

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def changed(self) -> bool:
        """True when the stamp was replaced since the last call (or since construction)."""
        stamp = self._stamp()
        if stamp == self._seen:
            return False
        self._seen = stamp
        return stamp is not None

    def last_slot(self) -> Slot | None:
        """The slot the latest publish named, or None (no stamp, unreadable, or not a slot)."""
        try:
            data = json.loads(self._path.read_text(encoding="utf-8"))
            return Slot.parse(str(data["slot"]))
        except (OSError, ValueError, KeyError, TypeError, InvalidName):
            return None
