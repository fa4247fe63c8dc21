"""Loading users' adapters into vLLM before they ask: new versions as they are published, and
the most recently published users at start-up.

A gateway learns of a publish only from the store (a trainer writes `current.json` on a shared
volume; the gateway's store is read-only): `AdapterStore.current_id` costs one `stat` while a
slot is unchanged, and the store's publish stamp (`fedpersona.adapters.announce`) one `stat` for
the whole store. `AdapterPreloader` looks at the stamp every `NOTICE_S` and polls the slots, in
the background, for two sets of users:

- when the stamp changed, and at the latest every `POLL_S`, the `RECENT_USERS` users whose
  adapters here were used most recently, and the user the stamp names: a new version of theirs
  is loaded at once, replacing their old one (`AdapterManager.preload`: the old one is
  superseded and unloaded as after a request), so their next request does not pay the load
  (without the stamp, a request arriving within `POLL_S` of a publish would);
- every `SCAN_S`, every user in the store, most recently published first: their current
  version is loaded while the engine holds fewer than `AdapterManager.preload_limit` adapters
  and this engine is where their requests go (`AdapterManager.prefers`; a replica set narrows
  it to the user's first replica). At start-up this warms the engine up to that limit; later it
  picks up new users. It never evicts another user's adapter to make room.

Loads go one at a time (the engine does them between batches; serving goes on meanwhile). A
preload that fails never reaches a request: a refused version is not tried again (its first
request loads on demand and is refused the same way), an unreachable engine is tried again at
the next poll, and anything else is logged. After an engine restart (`AdapterManager.reset`)
everything is preloaded again.

Knows nothing about HTTP, vLLM's API or how names are formed; all loading goes through the
manager.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from fedpersona.adapters import AdapterError, AdapterStore, Slot, SlotKind
from fedpersona.adapters.announce import PublishWatch
from fedpersona.service.errors import AdapterLoadFailed, EngineUnavailable

if TYPE_CHECKING:
    from fedpersona.service.engine.adapters import AdapterManager

logger = logging.getLogger(__name__)

NOTICE_S = 0.02  # the store's publish stamp: a publish is noticed within this
POLL_S = 0.2  # recently served users, without a stamp change (a missed or unwritten stamp)
SCAN_S = 5.0  # every user in the store (start-up warming, new users)
RECENT_USERS = 64


class AdapterPreloader:
    """Background loop that keeps the engine one step ahead of the store (see module doc)."""

    def __init__(
        self,
        manager: AdapterManager,
        store: AdapterStore,
        *,
        notice_s: float = NOTICE_S,
        poll_s: float = POLL_S,
        scan_s: float = SCAN_S,
        recent: int = RECENT_USERS,
    ) -> None:
        self._manager = manager
        self._store = store
        # notice_s 0: no stamp watch, the per-slot poll alone (every poll_s)
        self._watch = PublishWatch(store.root) if notice_s > 0 else None
        self._notice_s = notice_s if notice_s > 0 else poll_s
        self._poll_s = poll_s
        self._scan_s = scan_s
        self._recent = recent
        self._seen: dict[str, str] = {}  # user -> version id preloaded (or refused) last
        self._generation = manager.generation

    async def run(self) -> None:
        """Poll forever (cancel to stop); a failing round is logged and the next one runs."""
        scanned_at = polled_at = float("-inf")
        while True:
            now = time.monotonic()
            scan = now - scanned_at >= self._scan_s
            noticed = self._watch is not None and self._watch.changed()
            if noticed or scan or now - polled_at >= self._poll_s:
                first = self._announced_user() if noticed else None
                try:
                    await self.step(scan=scan, first=first)
                except Exception:  # the preloader must outlive any one bad round
                    logger.exception("adapter preload round failed")
                polled_at = time.monotonic()
                if scan:
                    scanned_at = polled_at
            await asyncio.sleep(self._notice_s)

    def _announced_user(self) -> str | None:
        """The user whose served slot the store's latest publish named, if it was one."""
        slot = self._watch.last_slot() if self._watch is not None else None
        return slot.user if slot is not None and slot.kind is SlotKind.USER_SERVED else None

    async def step(self, *, scan: bool, first: str | None = None) -> list[str]:
        """One round: `first` (the user a publish named), the recently served users, and with
        `scan` every user in the store. Returns the adapter names loaded."""
        manager = self._manager
        if manager.generation != self._generation:  # the engine restarted: start over
            self._generation = manager.generation
            self._seen.clear()
        recent = manager.recent_users(self._recent)
        if first is not None and first not in recent:
            recent = [first, *recent]
        loaded: list[str] = []
        if await self._preload_each(recent, loaded) and scan and self._has_room():
            others = await asyncio.to_thread(self._changed, set(recent))
            await self._preload_each(others, loaded)
        if loaded:
            logger.info("preloaded %d adapters (%d registered)", len(loaded), len(manager.loaded))
        return loaded

    def _has_room(self) -> bool:
        return len(self._manager.loaded) < self._manager.preload_limit

    async def _preload_each(self, users: list[str], loaded: list[str]) -> bool:
        """Preload each user's new version, in order (names appended to `loaded`); False when
        the engine could not be reached (the rest waits for the next round)."""
        manager = self._manager
        for user in users:
            try:
                version_id = self._store.current_id(Slot.user_served(user))
            except AdapterError:
                continue  # the request path reports an unreadable slot
            if version_id is None or self._seen.get(user) == version_id:
                continue
            if not manager.has_room():
                continue  # every adapter is in use: wait for one to go idle
            if not manager.serves(user):
                if not self._has_room():
                    continue  # no free room (maybe later)
                if not manager.prefers(user):
                    self._seen[user] = version_id  # another replica's user
                    continue
            try:
                name = await manager.preload(user)
            except EngineUnavailable as e:
                logger.debug("preload of %s postponed: %s", user, e)
                return False
            except AdapterLoadFailed:
                logger.warning("preload of %s@%s refused; left to its requests", user, version_id)
            except Exception:  # a preload must never take serving down with it
                logger.exception("preload of %s@%s failed", user, version_id)
            else:
                if name is not None:
                    loaded.append(name)
            self._seen[user] = version_id
        return True

    def _changed(self, skip: set[str]) -> list[str]:
        """Users not in `skip` whose served version is not the one preloaded last, most recently
        published first (runs in a thread: it lists the store and reads version records)."""
        found = []
        for user in self._store.users():
            if user in skip:
                continue
            slot = Slot.user_served(user)
            try:
                if self._store.current_id(slot) in (None, self._seen.get(user)):
                    continue
                version = self._store.current(slot)
            except AdapterError:
                continue
            if version is not None:
                found.append((version.created_at, user))
        return [user for _, user in sorted(found, reverse=True)]
