"""Which adapter version answered a chat: the user's own, a global one (cold start), or none.

Chat serving reports it with every answer (the `x-fedpersona-adapter` header: `<slot>@<version
id>` or `base`) and counts its metrics by it (`ServedKind`). The engine only knows the adapter's
name (`u-<user>-<version id>`); `ServedLookup` turns it back into a slot of the store.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from fedpersona.adapters import AdapterError, AdapterStore, Slot, SlotKind
from fedpersona.adapters.errors import InvalidName
from fedpersona.adapters.refs import parse_engine_adapter_name
from fedpersona.service.metrics import ServedKind

logger = logging.getLogger(__name__)

BASE_ADAPTER = "base"  # the header's value when the base model answered
GLOBAL_SLOTS_TTL_S = 5.0


@dataclass(frozen=True)
class Served:
    """What the engine answers a request with: `adapter` is `<slot>@<version id>` or `base`."""

    kind: ServedKind
    adapter: str = BASE_ADAPTER


BASE = Served(ServedKind.BASE)


class ServedLookup:
    """Names the store version behind an engine adapter name.

    `own` answers the common case on the event loop (one cached `stat`, quicker than a thread
    hand-off); `find` answers every case and may list the store's global slots (at most every
    `GLOBAL_SLOTS_TTL_S`), so callers run it in a thread.
    """

    def __init__(self, store: AdapterStore) -> None:
        self.store = store
        # Global adapter version id -> its slot; global slots listed at most every TTL seconds.
        self._global_versions: dict[str, Slot] = {}
        self._globals_read_at = -GLOBAL_SLOTS_TTL_S

    def own(self, user: str, engine_name: str) -> Served | None:
        """`engine_name` as the user's own served version when it is the slot's current one,
        else None (`find` tells, and logs, the rest)."""
        try:
            _, version_id = parse_engine_adapter_name(engine_name)
            own = Slot.user_served(user)
            if self.store.current_id(own) == version_id:
                return Served(ServedKind.PERSONAL, f"{own.path}@{version_id}")
        except (InvalidName, AdapterError):
            pass
        return None

    def find(self, user: str, engine_name: str) -> Served:
        """The user's own served version, or (cold start) a global adapter's. A version that is
        neither any more was the user's own (superseded since)."""
        served = self.own(user, engine_name)
        if served is not None:
            return served
        try:
            _, version_id = parse_engine_adapter_name(engine_name)
        except InvalidName:
            return Served(ServedKind.PERSONAL, engine_name)
        try:
            slot = self._global_slot(version_id)
            if slot is not None:
                return Served(ServedKind.GLOBAL, f"{slot.path}@{version_id}")
        except AdapterError as e:
            logger.warning("store: cannot tell which slot serves %s: %s", engine_name, e)
        return Served(ServedKind.PERSONAL, f"{Slot.user_served(user).path}@{version_id}")

    def _global_slot(self, version_id: str) -> Slot | None:
        slot = self._global_versions.get(version_id)
        now = time.monotonic()
        if slot is None and now - self._globals_read_at >= GLOBAL_SLOTS_TTL_S:
            self._globals_read_at = now
            for candidate in self.store.slots():
                if candidate.kind is SlotKind.GLOBAL_ADAPTER:
                    current = self.store.current_id(candidate)
                    if current is not None:
                        self._global_versions[current] = candidate
            slot = self._global_versions.get(version_id)
        return slot
