"""N vLLM replicas behind one gateway: adapter-affinity routing, failover, discovery.

`ReplicaSet` stands in for both the engine client and the adapter manager of a single-engine
gateway (it has `use(user)` like `AdapterManager` and `chat`/`stream_chat` like `EngineClient`),
so chat serving does not know how many engines there are. `use(user)` picks the user's replica
(`fedpersona.service.engine.replicas.candidates`: rendezvous hashing with bounded load over the
healthy replicas), pins the user's adapter there through that replica's own `AdapterManager`,
and remembers the choice for the request (a context variable), so the chat that follows goes to
the same replica.

Failover: a replica that cannot be reached (on the adapter load, or when the chat is sent) is
marked down and the request moves to the user's next replica, loading the adapter there first;
a stream fails over only before its first line. A 404 for the user's adapter (the replica
restarted, or lost the name) reloads it in place on that replica and retries once. Requests are
lost only when no replica can answer.

Replicas come from a list of URLs, or from a headless Service's DNS name (its A records, one per
ready pod, re-resolved every `refresh_s`); every replica is probed (`/health`) as often. A replica
that comes back is reconciled (its manager forgets, then adopts what the engine still holds).

Knows nothing about HTTP routes, API keys or request bodies beyond their `model` field.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

from fedpersona.service.engine.adapters import AdapterManager
from fedpersona.service.engine.client import EngineClient
from fedpersona.service.engine.replicas import (
    DEFAULT_LOAD_FACTOR,
    candidates,
    rendezvous_order,
    replica_urls,
)
from fedpersona.service.errors import EngineRequestError, EngineUnavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")
Resolver = Callable[[str, int], Awaitable[list[str]]]


@dataclass(eq=False)
class Replica:
    url: str
    client: EngineClient
    adapters: AdapterManager
    healthy: bool = True
    active: int = 0  # requests routed here and not finished (streams until their end)


@dataclass(frozen=True)
class _Route:
    replica: Replica
    user: str
    name: str | None


_ROUTE: ContextVar[_Route | None] = ContextVar("fedpersona_replica_route", default=None)


async def resolve_addresses(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to (A/AAAA records), sorted."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


class ReplicaSet:
    """Routes each user to one of several vLLM replicas and keeps each replica's adapters."""

    def __init__(
        self,
        *,
        make_client: Callable[[str], EngineClient],
        make_adapters: Callable[[EngineClient], AdapterManager],
        urls: Sequence[str] = (),
        dns: tuple[str, int] | None = None,
        load_factor: float = DEFAULT_LOAD_FACTOR,
        refresh_s: float = 5.0,
        resolve: Resolver = resolve_addresses,
    ) -> None:
        if not urls and dns is None:
            raise ValueError("a replica set needs replica URLs or a DNS name")
        self._make_client = make_client
        self._make_adapters = make_adapters
        self._dns = dns
        self._resolve = resolve
        self._factor = load_factor
        self._refresh_s = refresh_s
        self._replicas: dict[str, Replica] = {}
        for url in urls:
            self._add(url.rstrip("/"))
        self._task: asyncio.Task[None] | None = None
        self._retired: set[asyncio.Task[None]] = set()

    # -- membership and health -------------------------------------------------------------

    @property
    def replicas(self) -> list[Replica]:
        return list(self._replicas.values())

    def _add(self, url: str) -> Replica:
        client = self._make_client(url)
        replica = Replica(url=url, client=client, adapters=self._make_adapters(client))
        self._replicas[url] = replica
        return replica

    async def start(self) -> None:
        """Discover (DNS), reconcile every replica's adapters, then keep probing."""
        await self.refresh()
        await asyncio.gather(*(r.adapters.start() for r in self.replicas))
        self._task = asyncio.create_task(self._watch())

    async def refresh(self) -> None:
        """One round of discovery (DNS) and health probes."""
        if self._dns is not None:
            await self._discover(*self._dns)
        await asyncio.gather(*(self._probe(r) for r in self.replicas))

    async def _discover(self, host: str, port: int) -> None:
        try:
            urls = set(replica_urls(await self._resolve(host, port), port))
        except OSError as e:
            logger.warning("cannot resolve replicas at %s: %s (keeping %d)", host, e, len(self))
            return
        for url in urls - set(self._replicas):
            logger.info("replica %s joined", url)
            replica = self._add(url)
            await replica.adapters.start()
        for url in set(self._replicas) - urls:
            logger.info("replica %s left", url)
            self._retire(self._replicas.pop(url))

    def _retire(self, replica: Replica) -> None:
        async def close() -> None:
            await replica.client.wait_idle(60.0)
            await replica.adapters.aclose()
            await replica.client.aclose()

        task = asyncio.create_task(close())
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    async def _probe(self, replica: Replica) -> None:
        healthy = await replica.client.health()
        if healthy and not replica.healthy:
            # It may have restarted and lost every adapter: forget, then adopt what it holds.
            replica.adapters.reset()
            await replica.adapters.start()
            logger.info("replica %s is back", replica.url)
        elif not healthy and replica.healthy:
            logger.warning("replica %s failed its health check", replica.url)
        replica.healthy = healthy

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                await self.refresh()
            except Exception:  # the watcher must outlive any one bad round
                logger.exception("replica refresh failed")

    def _mark_down(self, replica: Replica, error: Exception) -> None:
        if replica.healthy:
            logger.warning("replica %s unreachable, failing over: %s", replica.url, error)
        replica.healthy = False

    def __len__(self) -> int:
        return len(self._replicas)

    # -- routing ---------------------------------------------------------------------------

    def order(self, user: str | None) -> list[Replica]:
        """Replicas to try for `user` (None: the base model, least loaded first): healthy ones
        by bounded-load rendezvous, then the ones marked down, as a last resort."""
        healthy = [r.url for r in self._replicas.values() if r.healthy]
        down = [r.url for r in self._replicas.values() if not r.healthy]
        if user is None:
            urls = sorted(healthy, key=lambda u: (self._replicas[u].active, u)) + sorted(down)
        else:
            load = {u: self._replicas[u].active for u in healthy}
            urls = candidates(user, healthy, load=load, factor=self._factor)
            urls += rendezvous_order(user, down)
        return [self._replicas[u] for u in urls]

    def use(self, user_id: str) -> AbstractAsyncContextManager[str | None]:
        """Pin `user_id`'s adapter on their replica for one request (see `AdapterManager.use`)."""
        return self._use(user_id)

    @asynccontextmanager
    async def _use(self, user: str) -> AsyncIterator[str | None]:
        last: EngineUnavailable | None = None
        for replica in self.order(user):
            async with AsyncExitStack() as stack:
                try:
                    name = await stack.enter_async_context(replica.adapters.use(user))
                except EngineUnavailable as e:
                    self._mark_down(replica, e)
                    last = e
                    continue
                replica.active += 1
                stack.callback(self._done, replica)
                token = _ROUTE.set(_Route(replica, user, name))
                try:
                    yield name
                finally:
                    # A stream ends in another task (another context): nothing to reset there.
                    with contextlib.suppress(ValueError):
                        _ROUTE.reset(token)
                return
        raise last or EngineUnavailable()

    @staticmethod
    def _done(replica: Replica) -> None:
        replica.active -= 1

    async def _send(
        self,
        body: dict[str, Any],
        call: Callable[[Replica, dict[str, Any]], Awaitable[T]],
        stack: AsyncExitStack,
    ) -> T:
        """`call` on the request's replica, else on the next ones; pins taken for a fallback
        replica go on `stack`, which the caller closes when the response is finished."""
        route = _ROUTE.get()
        if route is None:
            order = self.order(None)
        else:
            order = [route.replica, *(r for r in self.order(route.user) if r is not route.replica)]
        last: EngineUnavailable | None = None
        for replica in order:
            send = body
            try:
                if route is None:
                    replica.active += 1
                    stack.callback(self._done, replica)
                elif replica is not route.replica:
                    name = await stack.enter_async_context(replica.adapters.use(route.user))
                    send = {**body, "model": name} if name is not None else body
                try:
                    return await call(replica, send)
                except EngineRequestError as e:
                    if e.status != 404 or route is None or route.name is None:
                        raise
                    # The replica lost the adapter (restarted, or someone unloaded it): load it
                    # again in place there and retry once.
                    replica.adapters.invalidate(str(send["model"]))
                    name = await stack.enter_async_context(replica.adapters.use(route.user))
                    return await call(replica, {**body, "model": name or body["model"]})
            except EngineUnavailable as e:
                self._mark_down(replica, e)
                last = e
        raise last or EngineUnavailable()

    # -- the engine interface --------------------------------------------------------------

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        async with AsyncExitStack() as stack:
            return await self._send(body, lambda r, b: r.client.chat(b), stack)

    def stream_chat(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        return self._stream(body)

    async def _stream(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        async def open_stream(
            replica: Replica, send: dict[str, Any]
        ) -> tuple[bytes | None, AsyncIterator[bytes]]:
            lines = aiter(replica.client.stream_chat(send))
            stack.push_async_callback(_aclose, lines)
            return await anext(lines, None), lines

        async with AsyncExitStack() as stack:
            first, lines = await self._send(body, open_stream, stack)
            if first is None:
                return
            yield first
            async for line in lines:
                yield line

    async def health(self) -> bool:
        """True when some replica answers /health."""
        results = await asyncio.gather(*(r.client.health() for r in self.replicas))
        return any(results)

    @property
    def in_flight(self) -> int:
        return sum(r.client.in_flight for r in self.replicas)

    async def wait_idle(self, timeout: float) -> bool:
        results = await asyncio.gather(*(r.client.wait_idle(timeout) for r in self.replicas))
        return all(results)

    def reset(self) -> None:
        for replica in self.replicas:
            replica.adapters.reset()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._retired):
            task.cancel()
        for replica in self.replicas:
            await replica.adapters.aclose()
            await replica.client.aclose()


async def _aclose(lines: AsyncIterator[bytes]) -> None:
    aclose = getattr(lines, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()
