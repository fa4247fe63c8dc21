"""N vLLM replicas behind one gateway: adapter-affinity routing, failover, discovery.

`ReplicaSet` stands in for both the engine client and the adapter manager of a single-engine
gateway (it has `use(user)` like `AdapterManager` and `chat`/`stream_chat` like `EngineClient`),
so chat serving does not know how many engines there are. `use(user)` picks the user's replica
(`fedpersona.service.engine.replicas.candidates`: rendezvous hashing with bounded load over the
healthy replicas), pins the user's adapter there through that replica's own `AdapterManager`,
and remembers the choice for the request (a context variable), so the chat that follows goes to
the same replica.

Failover (`_replica_failed` decides): when the chosen replica fails before anything was sent to
the client -- it cannot be reached or resets the connection, answers 502/503/504, answers 500
and then fails its health probe (a dying engine), or ends or errors a stream before its first
line -- it is marked down (skipped by later requests until its probe passes) and the request
moves to the user's next healthy replica in rendezvous order, each tried at most once, with the
user's adapter pinned there by that replica's own manager, exactly as for a routed request.
Once a stream's first line was handed on, nothing is retried: its client may have part of the
answer, and a second answer would duplicate it. A 4xx is the request's own and never retried,
except a 404 for the user's adapter (the replica restarted, or lost the name): that reloads it
in place on the same replica and retries once. Requests are lost only when no replica can
answer.

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
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

from fedpersona.service.engine.adapters import AdapterManager
from fedpersona.service.engine.client import EngineClient, flatten, stream_batches
from fedpersona.service.engine.events import aclose_quietly, server_error
from fedpersona.service.engine.replicas import (
    DEFAULT_LOAD_FACTOR,
    candidates,
    rendezvous_order,
    replica_urls,
)
from fedpersona.service.errors import AdapterLoadFailed, EngineRequestError, EngineUnavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")
Resolver = Callable[[str, int], Awaitable[list[str]]]

# Statuses that say the replica (or a proxy in front of it) failed, not the request.
FAILOVER_STATUSES = frozenset({502, 503, 504})
# What a replica can raise before answering; `ReplicaSet._replica_failed` tells which to retry.
_FAILURES = (EngineUnavailable, EngineRequestError, AdapterLoadFailed)


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
        # Preload (at start-up, new users) only on the replica a user's requests go to first.
        replica.adapters.prefers = lambda user: self._home(user) == url
        self._replicas[url] = replica
        return replica

    def _home(self, user: str) -> str | None:
        """The replica `user`'s requests go to while no replica is overloaded."""
        healthy = [r.url for r in self._replicas.values() if r.healthy]
        return next(iter(rendezvous_order(user, healthy)), None)

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
        """Skip `replica` for new requests until its health probe passes again."""
        if replica.healthy:
            logger.warning("replica %s failed, failing over: %s", replica.url, error)
        replica.healthy = False

    async def _replica_failed(self, replica: Replica, error: Exception) -> bool:
        """Whether `error` (raised before the client got anything) is the replica's failure, to
        fail over from, rather than the request's own, to raise: unreachable, 502/503/504, or a
        500 from a replica that now fails its health probe. Never a 4xx."""
        if isinstance(error, EngineUnavailable):
            return True
        # An adapter load the engine refused carries the engine's answer as its cause.
        cause = error.__cause__ if isinstance(error, AdapterLoadFailed) else error
        if not isinstance(cause, EngineRequestError):
            return False
        if cause.status in FAILOVER_STATUSES:
            return True
        return cause.status == 500 and not await replica.client.health()

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

    @staticmethod
    def _each_once(order: list[Replica]) -> Iterator[Replica]:
        """The replicas one request may try, in `order`, each at most once: the first, then
        those still healthy when their turn comes (a concurrent request may have marked one
        down); only when none was healthy, every one of them as a last resort."""
        last_resort = not any(r.healthy for r in order)
        for i, replica in enumerate(order):
            if i == 0 or last_resort or replica.healthy:
                yield replica

    @asynccontextmanager
    async def _use(self, user: str) -> AsyncIterator[str | None]:
        last: Exception | None = None
        for replica in self._each_once(self.order(user)):
            async with AsyncExitStack() as stack:
                try:
                    name = await stack.enter_async_context(replica.adapters.use(user))
                except _FAILURES as e:
                    if not await self._replica_failed(replica, e):
                        raise
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
        """`call` on the request's replica; if that replica fails (`_replica_failed`), on the
        user's next healthy replicas (`_each_once`). Pins taken for a fallback replica go on
        `stack`, which the caller closes when the response is finished. `call` must not hand
        anything to the client before it returns: what it raises is retried elsewhere."""
        route = _ROUTE.get()
        if route is None:
            order = self.order(None)
        else:
            order = [route.replica, *(r for r in self.order(route.user) if r is not route.replica)]
        last: Exception | None = None
        for replica in self._each_once(order):
            try:
                return await self._send_to(replica, route, body, call, stack)
            except _FAILURES as e:
                if not await self._replica_failed(replica, e):
                    raise
                self._mark_down(replica, e)
                last = e
        raise last or EngineUnavailable()

    async def _send_to(
        self,
        replica: Replica,
        route: _Route | None,
        body: dict[str, Any],
        call: Callable[[Replica, dict[str, Any]], Awaitable[T]],
        stack: AsyncExitStack,
    ) -> T:
        send = body
        if route is None or replica is not route.replica:
            replica.active += 1
            stack.callback(self._done, replica)
        fallback = route is not None and replica is not route.replica
        if fallback and route is not None and route.name and body.get("model") == route.name:
            # The user's adapter on this replica, pinned by its own manager (as `use` does):
            # the name it yields is the only user-specific part of the body that changes.
            name = await stack.enter_async_context(replica.adapters.use(route.user))
            send = {**body, "model": name} if name is not None else body
        try:
            return await call(replica, send)
        except EngineRequestError as e:
            if e.status != 404 or route is None or route.name is None:
                raise
            # The replica lost the adapter (restarted, or someone unloaded it): load it again
            # in place there and retry once.
            replica.adapters.invalidate(str(send["model"]))
            name = await stack.enter_async_context(replica.adapters.use(route.user))
            return await call(replica, {**body, "model": name or body["model"]})

    # -- the engine interface --------------------------------------------------------------

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        async with AsyncExitStack() as stack:
            return await self._send(body, lambda r, b: r.client.chat(b), stack)

    def stream_chat(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        return flatten(self._stream(body))

    def stream_chat_batches(self, body: dict[str, Any]) -> AsyncIterator[list[bytes]]:
        """`stream_chat`, the lines of one read together (`EngineClient.stream_chat_batches`)."""
        return self._stream(body)

    async def _stream(self, body: dict[str, Any]) -> AsyncGenerator[list[bytes], None]:
        """The stream of the first replica that sends a first line that is not a server error
        (failover before it, as `_send`). From the first line on, a failure reaches the caller
        as it is (the client may hold part of the answer): never retried, never duplicated."""

        async def open_stream(
            replica: Replica, send: dict[str, Any]
        ) -> tuple[list[bytes], AsyncIterator[list[bytes]]]:
            batches = aiter(stream_batches(replica.client, send))
            stack.push_async_callback(aclose_quietly, batches)
            try:
                first = await anext(batches, None)
                if not first:
                    raise EngineUnavailable(
                        "The inference engine closed the stream without answering."
                    )
                error = server_error(first[0])
                if error is not None:
                    raise error
            except BaseException:
                await aclose_quietly(batches)  # let the failed replica's connection go now
                raise
            return first, batches

        async with AsyncExitStack() as stack:
            first, batches = await self._send(body, open_stream, stack)
            yield first
            async for batch in batches:
                yield batch

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
