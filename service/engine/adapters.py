"""Which user adapters vLLM has loaded: hot-load on demand, pin while in use, evict LRU.

For each request, `AdapterManager.use(user)` asks the store whether the user's current served
version changed (`AdapterStore.current_id`, one `stat` while it has not; so a newly published
version is served from the next request on, with no restart), makes sure vLLM has it loaded
under `engine_adapter_name(user, version id)` (owned by `fedpersona.adapters.refs`), and pins it
until the request (including a whole stream) ends. A lock per adapter name makes concurrent
first requests load it once. A user without a served adapter of their own gets a global one
(`fedpersona.service.engine.cold_start` picks it).

Capacity is vLLM's business: a registration is a name and a path, the weights live in vLLM's
own LRU cache (`--max-cpu-loras`), which loads them again from the path when an evicted adapter
is asked for. So with the default `max_loaded=None` the only adapters this manager unloads are
versions a user no longer serves (superseded), `unload_grace_s` after they went idle. That makes
one engine safe to share between gateway replicas: names are content hashes, every gateway
loads the same name for the same version, and none removes a version another may still send
(after the grace, every gateway reads the newer version on its next request). `max_loaded` (an
engine this gateway alone uses, e.g. the embedded one) also bounds the names registered,
evicting the least recently used idle one first.

Start-up reconciliation (`start`): a gateway joining a running engine reads `/v1/models`,
adopts the adapters that are some user's current version (no reload) and unloads, after the
grace, those that are superseded. Names that are not `u-<user>-<id>` are left alone.

Preloading (`preload=N > 0`): `start()` (or, where nobody calls it, the first request) starts an
`AdapterPreloader` (`fedpersona.service.engine.preload` decides whom and when), which calls
`preload(user)` to load a user's current version before their next request, as a request would
(same lock, same eviction, the version it replaces superseded) but never over `max_loaded`. A
failed preload changes nothing: the next request loads on demand and fails the same way.

Invariant: a name is in `_loaded` only while vLLM has it registered (as far as we know). A load
that fails leaves no entry; an unload removes the entry before it talks to vLLM, under the same
per-name lock a loader takes, so a load and an unload of one name never interleave. When vLLM
restarts it forgets every adapter: `reset()` forgets them here too, and a 404 from the engine
for a name we think is loaded drops that name, so the next request loads it again.

This module knows nothing about HTTP routes, API keys or request bodies.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedpersona.adapters import AdapterError, AdapterStore, Slot, Version
from fedpersona.adapters.errors import InvalidName
from fedpersona.adapters.refs import engine_adapter_name, parse_engine_adapter_name
from fedpersona.service.engine.cold_start import ColdStart
from fedpersona.service.engine.preload import AdapterPreloader
from fedpersona.service.errors import AdapterLoadFailed, EngineRequestError, EngineUnavailable

if TYPE_CHECKING:
    from fedpersona.service.engine.client import EngineClient
    from fedpersona.service.metrics import Metrics

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Loaded:
    name: str
    user: str
    generation: int
    refs: int = 0
    superseded: bool = False


class AdapterManager:
    """Keeps vLLM's registered LoRA adapters in step with the store's current user versions."""

    def __init__(
        self,
        *,
        store: AdapterStore,
        engine: EngineClient,
        max_loaded: int | None = None,
        metrics: Metrics | None = None,
        cold_start_method: str | None = None,
        unload_grace_s: float = 0.0,
        preload: int = 0,
        background: bool = True,
    ) -> None:
        """`max_loaded`: most adapters kept registered (None: no bound here, vLLM's LRU bounds
        memory; set it only for an engine no other gateway uses). `unload_grace_s`: how long a
        superseded version stays registered after its last request here (other gateways may
        not have read the newer version yet). `preload`: most adapters registered ahead of
        requests (0: off; a served user's new version replaces their old one, at any count);
        with `background=False` its rounds run only when `preloader.step()` is called."""
        if max_loaded is not None and max_loaded < 1:
            raise ValueError(f"max_loaded must be at least 1, got {max_loaded}")
        if unload_grace_s < 0 or preload < 0:
            raise ValueError(f"unload_grace_s, preload must be >= 0: {unload_grace_s}, {preload}")
        self._preload = preload if max_loaded is None else min(preload, max_loaded)
        self._background = background and preload > 0
        self._preloader: asyncio.Task[None] | None = None
        # Whether this engine is where `user`'s requests go (a replica set narrows it).
        self.prefers: Callable[[str], bool] = lambda _user: True
        self._grace_s = unload_grace_s
        self._cold_start = ColdStart(store, cold_start_method)
        self._store = store
        self._engine = engine
        self._max_loaded = max_loaded
        self._metrics = metrics
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()  # least recently used first
        self._newest: dict[str, str] = {}  # user -> name of the version last served to them
        # Names whose unload failed: vLLM may still hold them, so reload them in place.
        self._stale: set[str] = set()
        # Locks live only while someone holds or waits on them (thousands of users, few active).
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._tasks: set[asyncio.Task[None]] = set()
        self._delayed: set[asyncio.Task[None]] = set()  # superseded unloads waiting for grace
        self._generation = 0
        # user -> the served version read last time (re-read only when its id changed)
        self._versions: dict[str, Version] = {}
        self.preloader = AdapterPreloader(self, store) if preload > 0 else None

    # -- public ----------------------------------------------------------------------------

    @property
    def loaded(self) -> list[str]:
        """Names registered in vLLM by this manager, least recently used first."""
        return list(self._loaded)

    def use(self, user_id: str) -> AbstractAsyncContextManager[str | None]:
        """Pin `user_id`'s current adapter for the duration of a request.

        Yields the vLLM model name to send: the user's served adapter, else (cold start) the
        newest global adapter, else None (the base model answers). Raises `AdapterLoadFailed` if
        vLLM refuses the adapter and `EngineUnavailable` if the engine cannot be reached.
        """
        return self._use(user_id)

    def invalidate(self, name: str) -> None:
        """The engine answered 404 for `name`: forget it (the next `use` loads it again, in
        place)."""
        entry = self._loaded.get(name)
        if entry is not None:
            self._forget(entry)
        self._stale.add(name)

    def reset(self) -> None:
        """Forget everything loaded: the engine restarted and lost its adapters."""
        self._generation += 1
        dropped = len(self._loaded)
        self._loaded.clear()
        self._newest.clear()
        self._stale.clear()
        if dropped:
            logger.info("engine restarted: forgot %d loaded adapters", dropped)

    @property
    def generation(self) -> int:
        """Bumped by `reset`: what was loaded before is gone."""
        return self._generation

    @property
    def preload_limit(self) -> int:
        """Most adapters registered ahead of requests (0: preloading is off)."""
        return self._preload

    def serves(self, user_id: str) -> bool:
        """Whether a version of `user_id` is registered here for their requests."""
        return user_id in self._newest

    def recent_users(self, limit: int) -> list[str]:
        """Up to `limit` users with a registered adapter, most recently used first."""
        users: dict[str, None] = {}
        for entry in reversed(self._loaded.values()):
            if len(users) >= limit:
                break
            users[entry.user] = None
        return list(users)

    async def preload(self, user_id: str) -> str | None:
        """Load `user_id`'s current served version now, ahead of their next request, as a
        request would, except that it never goes over `max_loaded` (None then). Returns the name
        loaded; None when there is nothing to do. Raises what a request's load raises."""
        try:
            if self._store.current_id(Slot.user_served(user_id)) is None:
                return None  # cold start: the first request picks the global adapter
        except AdapterError as e:
            raise AdapterLoadFailed() from e
        version = self._current(user_id)
        if version is None:
            return None
        name = engine_adapter_name(user_id, version.id)
        if name in self._loaded or not self.has_room():
            return None
        async with self._lock(name):
            if name in self._loaded or not self.has_room():
                return None
            entry = await self._load(user_id, name, version)
        cached = self._versions.get(user_id)
        if cached is not None and cached.id == version.id:
            self._make_newest(user_id, entry)
        else:  # a newer version was read meanwhile (and is served): this one is superseded
            entry.superseded = True
            self._spawn(self._unload_later(entry))
        return name

    def has_room(self) -> bool:
        """Whether one more adapter fits without evicting one in use (see `_make_room`)."""
        if self._max_loaded is None or len(self._loaded) < self._max_loaded:
            return True
        return any(e.refs == 0 for e in self._loaded.values())

    def _start_preloader(self) -> None:
        if self.preloader is not None and self._background and self._preloader is None:
            self._preloader = asyncio.get_running_loop().create_task(self.preloader.run())

    async def start(self) -> None:
        """Reconcile with what the engine already holds (a gateway joining a shared engine),
        then start preloading (if on).

        Adopts every `u-<user>-<id>` that is `user`'s current version, unloads (after the grace)
        the ones that are not; an engine that cannot be asked is left as it is."""
        try:
            names = await self._engine.models()
        except (EngineUnavailable, EngineRequestError) as e:
            logger.warning("could not list the engine's adapters at start-up: %s", e)
            self._start_preloader()
            return
        adopted = superseded = 0
        for name in names:
            try:
                user, version_id = parse_engine_adapter_name(name)
            except InvalidName:
                continue  # the base model, or a name this gateway does not manage
            if name in self._loaded:
                continue
            try:
                current = self._current(user)
            except AdapterLoadFailed:
                continue  # unreadable store entry: leave the engine alone
            entry = _Loaded(name=name, user=user, generation=self._generation)
            self._loaded[name] = entry
            if current is not None and current.id == version_id:
                self._newest[user] = name
                adopted += 1
            else:
                entry.superseded = True
                self._spawn(self._unload_later(entry))
                superseded += 1
        logger.info(
            "engine holds %d adapters: adopted %d current, unloading %d superseded",
            adopted + superseded,
            adopted,
            superseded,
        )
        self._start_preloader()

    async def aclose(self) -> None:
        """Wait for background unloads to finish (at shutdown); delayed ones are dropped (the
        next gateway to start reconciles them)."""
        if self._preloader is not None:
            self._preloader.cancel()
            await asyncio.gather(self._preloader, return_exceptions=True)
        for task in self._delayed:
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- the request path ------------------------------------------------------------------

    @asynccontextmanager
    async def _use(self, user_id: str) -> AsyncIterator[str | None]:
        if self._preloader is None and self._background:
            self._start_preloader()  # an embedded engine: nobody called start()
        version = self._current(user_id)
        if version is None:
            yield None
            return
        entry = await self._acquire(user_id, version)
        try:
            yield entry.name
        except EngineRequestError as e:
            if e.status == 404:
                # vLLM does not know the name: it restarted behind our back (external engine)
                # or dropped it. Forget it so the next request loads it again (in place, in
                # case it does hold the name after all).
                self._forget(entry)
                self._stale.add(entry.name)
            raise
        finally:
            self._release(entry)

    def _current(self, user_id: str) -> Version | None:
        """The user's current served version, read in full only when its id changed."""
        try:
            slot = Slot.user_served(user_id)
            version_id = self._store.current_id(slot)
            if version_id is None:
                self._versions.pop(user_id, None)
                return self._cold_start.version()
            cached = self._versions.get(user_id)
            if cached is not None and cached.id == version_id:
                return cached
            version = self._store.current(slot)
        except AdapterError as e:
            logger.error("store: cannot read the served adapter of %s: %s", user_id, e)
            raise AdapterLoadFailed() from e
        if version is None:
            self._versions.pop(user_id, None)
        else:
            self._versions[user_id] = version
        return version

    async def _acquire(self, user: str, version: Version) -> _Loaded:
        try:
            return await self._acquire_version(user, version)
        except AdapterLoadFailed:
            # Retention may have removed the version between current() and the load; the
            # store's contract is to retry with current() once.
            newer = self._current(user)
            if newer is None or newer.id == version.id:
                raise
            return await self._acquire_version(user, newer)

    async def _acquire_version(self, user: str, version: Version) -> _Loaded:
        name = engine_adapter_name(user, version.id)
        entry = self._loaded.get(name)
        if entry is None:
            async with self._lock(name):
                entry = self._loaded.get(name)
                if entry is None:
                    entry = await self._load(user, name, version)
                entry.refs += 1
        else:
            entry.refs += 1
        self._loaded.move_to_end(name)
        self._make_newest(user, entry)
        return entry

    def _make_newest(self, user: str, entry: _Loaded) -> None:
        """`entry` is the version `user` is served now; the one before it is superseded."""
        entry.superseded = False
        previous = self._newest.get(user)
        self._newest[user] = name = entry.name
        if previous is not None and previous != name:
            old = self._loaded.get(previous)
            if old is not None:
                old.superseded = True
                if old.refs == 0:
                    self._spawn(self._unload_later(old))

    def _release(self, entry: _Loaded) -> None:
        entry.refs -= 1
        if entry.refs > 0 or self._loaded.get(entry.name) is not entry:
            return
        if entry.superseded:
            self._spawn(self._unload_later(entry))
        elif self._max_loaded is not None and len(self._loaded) > self._max_loaded:
            self._spawn(self._trim())

    def _forget(self, entry: _Loaded) -> None:
        if self._loaded.get(entry.name) is entry:
            del self._loaded[entry.name]
            if self._newest.get(entry.user) == entry.name:
                del self._newest[entry.user]

    # -- talking to vLLM -------------------------------------------------------------------

    async def _load(self, user: str, name: str, version: Version) -> _Loaded:
        """Load `name` (caller holds its lock and found it absent)."""
        await self._make_room(user)
        generation = self._generation
        started = time.perf_counter()
        try:
            try:
                if name in self._stale:
                    await self._engine.load_lora(name, str(version.path), replace=True)
                else:
                    await self._engine.load_lora(name, str(version.path))
            except EngineRequestError as e:
                if e.status != 400 or name in self._stale:
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
        if generation != self._generation:
            # The engine restarted while we loaded: we cannot tell which engine has it.
            raise EngineUnavailable("The inference engine restarted; retry shortly.", retry_after=1)
        self._stale.discard(name)
        entry = _Loaded(name=name, user=user, generation=generation)
        self._loaded[name] = entry
        if self._metrics is not None:
            self._metrics.adapter_loads.inc()
            self._metrics.adapter_load_seconds.observe(elapsed)
        logger.info("loaded adapter %s in %.3f s (%d loaded)", name, elapsed, len(self._loaded))
        return entry

    async def _make_room(self, user: str) -> None:
        """Evict idle adapters until one more fits: first the version `user` is leaving, then
        the least recently used. Nothing to do without a bound (vLLM's LRU makes room)."""
        if self._max_loaded is None:
            return
        previous = self._loaded.get(self._newest.get(user, ""))
        if len(self._loaded) >= self._max_loaded and previous is not None and previous.refs == 0:
            await self._unload(previous, evicted=False)
        while len(self._loaded) >= self._max_loaded:
            victim = next((e for e in self._loaded.values() if e.refs == 0), None)
            if victim is None:
                # Every loaded adapter is pinned by a request: go over the bound for now;
                # `_release` trims back once requests finish.
                logger.warning(
                    "all %d loaded adapters are in use; loading one more", self._max_loaded
                )
                return
            await self._unload(victim, evicted=True)

    async def _trim(self) -> None:
        while self._max_loaded is not None and len(self._loaded) > self._max_loaded:
            victim = next((e for e in self._loaded.values() if e.refs == 0), None)
            if victim is None:
                return
            await self._unload(victim, evicted=True)

    async def _unload_later(self, entry: _Loaded) -> None:
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

    async def _unload(self, entry: _Loaded, *, evicted: bool) -> None:
        """Unload `entry` if it is still registered and idle; otherwise do nothing."""
        if self._loaded.get(entry.name) is not entry or entry.refs > 0:
            return
        # From here on a request for this name loads it again, in place (vLLM may still hold
        # it until the unload below has run).
        self._forget(entry)
        self._stale.add(entry.name)
        async with self._lock(entry.name):
            if entry.name in self._loaded:
                return  # reloaded in place while we waited for the lock: keep it
            try:
                await self._engine.unload_lora(entry.name)
            except (EngineUnavailable, EngineRequestError) as e:
                logger.warning("could not unload adapter %s: %s", entry.name, e)
                return
            if entry.generation == self._generation:
                self._stale.discard(entry.name)
        if self._metrics is not None:
            self._metrics.adapter_unloads.inc()
            if evicted:
                self._metrics.adapter_evictions.inc()
        logger.info("unloaded adapter %s (%s)", entry.name, "evicted" if evicted else "superseded")

    # -- plumbing --------------------------------------------------------------------------

    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[name] = lock
        return lock

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
