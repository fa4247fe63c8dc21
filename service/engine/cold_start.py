"""Which adapter answers a user who has no served adapter of their own yet (cold start).

The newest global adapter of the deployment's method (`global/adapters/<method>`), or, when no
method is set, the most recently published of the store's global adapters (their list re-read
at most every `COLD_START_TTL_S` seconds); None (the base model answers) only when there is no
global adapter at all. Used by `fedpersona.service.engine.adapters.AdapterManager`; reads the
store, talks to no engine.
"""

from __future__ import annotations

import time

from fedpersona.adapters import AdapterStore, Slot, SlotKind, Version

COLD_START_TTL_S = 5.0


class ColdStart:
    """Picks the global adapter for users without their own (see the module docstring)."""

    def __init__(self, store: AdapterStore, method: str | None = None) -> None:
        self._store = store
        self._slot = None if method is None else Slot.global_adapter(method)
        self._global_slots: tuple[float, list[Slot]] = (-COLD_START_TTL_S, [])

    def version(self) -> Version | None:
        """The newest global adapter of the deployment's method (any method if unset)."""
        if self._slot is not None:
            return self._store.current(self._slot)
        now = time.monotonic()
        read_at, slots = self._global_slots
        if now - read_at >= COLD_START_TTL_S:
            slots = [s for s in self._store.slots() if s.kind is SlotKind.GLOBAL_ADAPTER]
            self._global_slots = (now, slots)
        versions = [v for v in map(self._store.current, slots) if v is not None]
        return max(versions, key=lambda v: v.created_at, default=None)
