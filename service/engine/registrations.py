"""The adapter names one gateway registered in one vLLM: load, unload, evict, keep consistent.

`Registrations` is the engine-facing half of `fedpersona.service.engine.adapters.AdapterManager`
(which decides what to load: the store's current versions, pinned per request, or preloaded).
Each registration counts the requests using it (`refs`) and knows whether its user has moved on
to a newer version (`superseded`); they are kept least recently used first.

Unloads: a superseded version once idle and `unload_grace_s` later (other gateways sharing the
engine may still send it), unless it became current again meanwhile. With `max_loaded` (an
engine this gateway alone uses) also the least recently used idle name when one more must fit:
first the version the loading user leaves, never one in use (then the bound is exceeded until
requests finish, and trimmed back). Without it vLLM's own LRU bounds adapter memory.

Invariant: a name is in `entries` only while vLLM has it registered (as far as we know). A load
that fails leaves no entry; an unload removes the entry before it talks to vLLM, under the same
per-name lock a loader takes, so a load and an unload of one name never interleave. Names whose
unload failed, or that vLLM may hold without us knowing (`invalidate`), are `stale`: loaded
again in place. `reset()` (vLLM restarted and lost everything) forgets all and bumps
`generation`; a load that straddles a reset is not trusted.

Knows nothing about the store beyond a version's path, nor about requests or HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedpersona.adapters import Version
from fedpersona.service.errors import AdapterLoadFailed, EngineRequestError, EngineUnavailable

if TYPE_CHECKING:
    from fedpersona.service.engine.client import EngineClient
    from fedpersona.service.metrics import Metrics

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Registration:
    name: str
    user: str
    generation: int
    refs: int = 0
    superseded: bool = False


class Registrations:
    """What this gateway registered in one engine (see the module docstring)."""

    def __init__(
        self,
        *,
        engine: EngineClient,
        max_loaded: int | None,
        unload_grace_s: float,
        metrics: Metrics | None,
    ) -> None:
        self.max_loaded = max_loaded
        self._engine = engine
        self._grace_s = unload_grace_s
        self._metrics = metrics
        self.entries: OrderedDict[str, Registration] = OrderedDict()  # least recently used first
        self.newest: dict[str, str] = {}  # user -> name of the version last served to them
        self.stale: set[str] = set()
        self.generation = 0
        # Locks live only while someone holds or waits on them (thousands of users, few active).
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._tasks: set[asyncio.Task[None]] = set()
        self._delayed: set[asyncio.Task[None]] = set()  # superseded unloads waiting for grace

    def has_room(self) -> bool:
        """Whether one more adapter fits without evicting one in use (see `make_room`)."""
        if self.max_loaded is None or len(self.entries) < self.max_loaded:
            return True
        return any(e.refs == 0 for e in self.entries.values())

    def recent_users(self, limit: int) -> list[str]:
        """Up to `limit` users with a registered adapter, most recently used first."""
        users: dict[str, None] = {}
        for entry in reversed(self.entries.values()):
            if len(users) >= limit:
                break
            users[entry.user] = None
        return list(users)

    def reset(self) -> None:
        """Forget everything: the engine restarted and lost its adapters."""
        self.generation += 1
        dropped = len(self.entries)
        self.entries.clear()
        self.newest.clear()
        self.stale.clear()
        if dropped:
            logger.info("engine restarted: forgot %d loaded adapters", dropped)

    def adopt(self, name: str, user: str, *, current: bool) -> None:
        """Record `name`, found registered in the engine; unload it later unless `current`."""
        entry = Registration(name=name, user=user, generation=self.generation)
        self.entries[name] = entry
        if current:
            self.newest[user] = name
        else:
            entry.superseded = True
            self.spawn(self.unload_later(entry))

    def invalidate(self, entry: Registration | None, name: str) -> None:
        """vLLM does not know `name` (restarted behind our back, or dropped it): forget it, and
        load it again in place (in case it does hold the name after all)."""
        if entry is not None:
            self.forget(entry)
        self.stale.add(name)

    def make_newest(self, user: str, entry: Registration) -> None:
        """`entry` is the version `user` is served now; the one before it is superseded."""
        entry.superseded = False
        previous = self.newest.get(user)
        self.newest[user] = name = entry.name
        if previous is not None and previous != name:
            old = self.entries.get(previous)
            if old is not None:
                old.superseded = True
                if old.refs == 0:
                    self.spawn(self.unload_later(old))

    def release(self, entry: Registration) -> None:
        """A request using `entry` ended."""
        entry.refs -= 1
        if entry.refs > 0 or self.entries.get(entry.name) is not entry:
            return
        if entry.superseded:
            self.spawn(self.unload_later(entry))
        elif self.max_loaded is not None and len(self.entries) > self.max_loaded:
            self.spawn(self._trim())

    def forget(self, entry: Registration) -> None:
        if self.entries.get(entry.name) is entry:
            del self.entries[entry.name]
            if self.newest.get(entry.user) == entry.name:
                del self.newest[entry.user]

    async def aclose(self) -> None:
        """Wait for background unloads; delayed ones are dropped (the next gateway to start
        reconciles them)."""
        for task in self._delayed:
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- talking to vLLM -------------------------------------------------------------------

    async def load(self, user: str, name: str, version: Version) -> Registration:
        """Load `name` (caller holds its lock and found it absent)."""
        await self._make_room(user)
        generation = self.generation
        started = time.perf_counter()
        try:
            try:
                if name in self.stale:
                    await self._engine.load_lora(name, str(version.path), replace=True)
                else:
                    await self._engine.load_lora(name, str(version.path))
            except EngineRequestError as e:
                if e.status != 400 or name in self.stale:
                    raise
                # vLLM refuses a name it already holds with a 400: registered by a previous
                # gateway process (vLLM kept running) or another replica. Version names are
                # content hashes, so loading the same files in place is safe.
                await self._engine.load_lora(name, str(version.path), replace=True)
        except EngineRequestError as e:
            logger.error(
                "engine refused adapter %s from %s: %s %s", name, version.path, e.status, e.message
            )
            raise AdapterLoadFailed() from e
        elapsed = time.perf_counter() - started
        if generation != self.generation:
            # The engine restarted while we loaded: we cannot tell which engine has it.
            raise EngineUnavailable("The inference engine restarted; retry shortly.", retry_after=1)
        self.stale.discard(name)
        entry = Registration(name=name, user=user, generation=generation)
        self.entries[name] = entry
        if self._metrics is not None:
            self._metrics.adapter_loads.inc()
            self._metrics.adapter_load_seconds.observe(elapsed)
        logger.info("loaded adapter %s in %.3f s (%d loaded)", name, elapsed, len(self.entries))
        return entry

    async def _make_room(self, user: str) -> None:
        """Evict idle adapters until one more fits: first the version `user` is leaving, then
        the least recently used. Nothing to do without a bound (vLLM's LRU makes room)."""
        if self.max_loaded is None:
            return
        previous = self.entries.get(self.newest.get(user, ""))
        if len(self.entries) >= self.max_loaded and previous is not None and previous.refs == 0:
            await self._unload(previous, evicted=False)
        while len(self.entries) >= self.max_loaded:
            victim = next((e for e in self.entries.values() if e.refs == 0), None)
            if victim is None:
                # Every loaded adapter is pinned by a request: go over the bound for now;
                # `release` trims back once requests finish.
                logger.warning(
                    "all %d loaded adapters are in use; loading one more", self.max_loaded
                )
                return
            await self._unload(victim, evicted=True)

    async def _trim(self) -> None:
        while self.max_loaded is not None and len(self.entries) > self.max_loaded:
            victim = next((e for e in self.entries.values() if e.refs == 0), None)
            if victim is None:
                return
            await self._unload(victim, evicted=True)

    async def unload_later(self, entry: Registration) -> None:
        """Unload a superseded version once the grace has passed, if it is still superseded
        and idle then (a rollback may have made it current again)."""
        if self._grace_s > 0:
            task = asyncio.current_task()
            assert task is not None
            self._delayed.add(task)
            try:
                await asyncio.sleep(self._grace_s)
            finally:
                self._delayed.discard(task)
        if entry.superseded:
            await self._unload(entry, evicted=False)

    async def _unload(self, entry: Registration, *, evicted: bool) -> None:
        """Unload `entry` if it is still registered and idle; otherwise do nothing."""
        if self.entries.get(entry.name) is not entry or entry.refs > 0:
            return
        # From here on a request for this name loads it again, in place (vLLM may still hold
        # it until the unload below has run).
        self.forget(entry)
        self.stale.add(entry.name)
        async with self.lock(entry.name):
            if entry.name in self.entries:
                return  # reloaded in place while we waited for the lock: keep it
            try:
                await self._engine.unload_lora(entry.name)
            except (EngineUnavailable, EngineRequestError) as e:
                logger.warning("could not unload adapter %s: %s", entry.name, e)
                return
            if entry.generation == self.generation:
                self.stale.discard(entry.name)
        if self._metrics is not None:
            self._metrics.adapter_unloads.inc()
            if evicted:
                self._metrics.adapter_evictions.inc()
        logger.info("unloaded adapter %s (%s)", entry.name, "evicted" if evicted else "superseded")

    # -- plumbing --------------------------------------------------------------------------

    def lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[name] = lock
        return lock

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
