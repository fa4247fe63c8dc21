"""Which user adapters vLLM has loaded: hot-load on demand, pin while in use, preload ahead.

For each request, `AdapterManager.use(user)` asks the store whether the user's current served
version changed (`AdapterStore.current_id`, one `stat` while it has not; so a newly published
version is served from the next request on, with no restart), makes sure vLLM has it loaded
under `engine_adapter_name(user, version id)` (owned by `fedpersona.adapters.refs`), and pins it
until the request (including a whole stream) ends. A lock per adapter name makes concurrent
first requests load it once. A user without a served adapter of their own gets a global one
(`fedpersona.service.engine.cold_start` picks it). What is registered in the engine, and when it
is unloaded or evicted, is `fedpersona.service.engine.registrations`' business.

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

This module knows nothing about HTTP routes, API keys or request bodies.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING

from fedpersona.adapters import AdapterError, AdapterStore, Slot, Version
from fedpersona.adapters.errors import InvalidName
from fedpersona.adapters.refs import engine_adapter_name, parse_engine_adapter_name
from fedpersona.service.engine.cold_start import ColdStart
from fedpersona.service.engine.preload import NOTICE_S, AdapterPreloader
from fedpersona.service.engine.registrations import Registration, Registrations
from fedpersona.service.errors import AdapterLoadFailed, EngineRequestError, EngineUnavailable

if TYPE_CHECKING:
    from fedpersona.service.engine.client import EngineClient
    from fedpersona.service.metrics import Metrics

logger = logging.getLogger(__name__)


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
        preload_notice_s: float = NOTICE_S,
        background: bool = True,
    ) -> None:
        """`max_loaded`: most adapters kept registered (None: no bound here, vLLM's LRU bounds
        memory; set it only for an engine no other gateway uses). `unload_grace_s`: how long a
        superseded version stays registered after its last request here (other gateways may
        not have read the newer version yet). `preload`: most adapters registered ahead of
        requests (0: off; a served user's new version replaces their old one, at any count);
        `preload_notice_s`: how often the preloader looks at the store's publish stamp (0: never,
        the 0.2 s per-slot poll alone); with `background=False` its rounds run only when
        `preloader.step()` is called."""
        if max_loaded is not None and max_loaded < 1:
            raise ValueError(f"max_loaded must be at least 1, got {max_loaded}")
        if unload_grace_s < 0 or preload < 0:
            raise ValueError(f"unload_grace_s, preload must be >= 0: {unload_grace_s}, {preload}")
        self._store = store
        self._engine = engine
        self._metrics = metrics
        self._cold_start = ColdStart(store, cold_start_method)
        self._reg = Registrations(
            engine=engine, max_loaded=max_loaded, unload_grace_s=unload_grace_s, metrics=metrics
        )
        # user -> the served version read last time (re-read only when its id changed)
        self._versions: dict[str, Version] = {}
        self._preload = preload if max_loaded is None else min(preload, max_loaded)
        self.preloader = (
            AdapterPreloader(self, store, notice_s=preload_notice_s) if preload > 0 else None
        )
        self._background = background and self.preloader is not None
        self._preloading: asyncio.Task[None] | None = None
        # Whether this engine is where `user`'s requests go (a replica set narrows it).
        self.prefers: Callable[[str], bool] = lambda _user: True

    # -- public ----------------------------------------------------------------------------

    @property
    def loaded(self) -> list[str]:
        """Names registered in vLLM by this manager, least recently used first."""
        return list(self._reg.entries)

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
        self._reg.invalidate(self._reg.entries.get(name), name)

    def reset(self) -> None:
        """Forget everything loaded: the engine restarted and lost its adapters."""
        self._reg.reset()

    async def start(self) -> None:
        """Reconcile with what the engine already holds (a gateway joining a shared engine),
        then start preloading (if on).

        Adopts every `u-<user>-<id>` that is `user`'s current version, unloads (after the grace)
        the ones that are not; an engine that cannot be asked is left as it is."""
        try:
            names = await self._engine.models()
        except (EngineUnavailable, EngineRequestError) as e:
            logger.warning("could not list the engine's adapters at start-up: %s", e)
            names = []
        adopted = superseded = 0
        for name in names:
            try:
                user, version_id = parse_engine_adapter_name(name)
            except InvalidName:
                continue  # the base model, or a name this gateway does not manage
            if name in self._reg.entries:
                continue
            try:
                current = self._current(user)
            except AdapterLoadFailed:
                continue  # unreadable store entry: leave the engine alone
            is_current = current is not None and current.id == version_id
            self._reg.adopt(name, user, current=is_current)
            adopted += is_current
            superseded += not is_current
        if names:
            logger.info(
                "engine holds %d adapters: adopted %d current, unloading %d superseded",
                adopted + superseded,
                adopted,
                superseded,
            )
        self.start_preloading()

    async def aclose(self) -> None:
        """Stop preloading and wait for background unloads to finish (at shutdown); delayed
        ones are dropped (the next gateway to start reconciles them)."""
        if self._preloading is not None:
            self._preloading.cancel()
            await asyncio.gather(self._preloading, return_exceptions=True)
        await self._reg.aclose()

    # -- preloading (`fedpersona.service.engine.preload` calls these) ----------------------

    @property
    def generation(self) -> int:
        """Bumped by `reset`: what was loaded before is gone."""
        return self._reg.generation

    @property
    def preload_limit(self) -> int:
        """Most adapters registered ahead of requests (0: preloading is off)."""
        return self._preload

    def serves(self, user_id: str) -> bool:
        """Whether a version of `user_id` is registered here for their requests."""
        return user_id in self._reg.newest

    def has_room(self) -> bool:
        """Whether one more adapter fits without evicting one in use."""
        return self._reg.has_room()

    def recent_users(self, limit: int) -> list[str]:
        """Up to `limit` users with a registered adapter, most recently used first."""
        return self._reg.recent_users(limit)

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
        reg = self._reg
        name = engine_adapter_name(user_id, version.id)
        if name in reg.entries or not reg.has_room():
            return None
        async with reg.lock(name):
            if name in reg.entries or not reg.has_room():
                return None
            entry = await reg.load(user_id, name, version)
        if self._metrics is not None:
            self._metrics.adapter_preloads.inc()
        cached = self._versions.get(user_id)
        if cached is not None and cached.id == version.id:
            reg.make_newest(user_id, entry)
        else:  # a newer version was read meanwhile (and is served): this one is superseded
            entry.superseded = True
            reg.spawn(reg.unload_later(entry))
        return name

    def start_preloading(self) -> None:
        """Start the background preloader (if on) without reconciling: an embedded engine,
        which starts empty and whose supervisor resets this manager on every restart."""
        if self.preloader is not None and self._background and self._preloading is None:
            self._preloading = asyncio.get_running_loop().create_task(self.preloader.run())

    # -- the request path ------------------------------------------------------------------

    @asynccontextmanager
    async def _use(self, user_id: str) -> AsyncIterator[str | None]:
        if self._preloading is None and self._background:
            self.start_preloading()  # an embedded engine: nobody called start()
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
                # or dropped it; the next request loads it again.
                self._reg.invalidate(entry, entry.name)
            raise
        finally:
            self._reg.release(entry)

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

    async def _acquire(self, user: str, version: Version) -> Registration:
        try:
            return await self._acquire_version(user, version)
        except AdapterLoadFailed:
            # Retention may have removed the version between current() and the load; the
            # store's contract is to retry with current() once.
            newer = self._current(user)
            if newer is None or newer.id == version.id:
                raise
            return await self._acquire_version(user, newer)

    async def _acquire_version(self, user: str, version: Version) -> Registration:
        reg = self._reg
        name = engine_adapter_name(user, version.id)
        entry = reg.entries.get(name)
        if entry is None:
            async with reg.lock(name):
                entry = reg.entries.get(name)
                if entry is None:
                    entry = await reg.load(user, name, version)
                entry.refs += 1
        else:
            entry.refs += 1
        reg.entries.move_to_end(name)
        reg.make_newest(user, entry)
        return entry
