"""Preloading: a published version is loaded before anyone asks for it, within the bounds.

`AdapterPreloader` rounds are driven by hand (`step`) against a real `AdapterStore` and the
recording fake of vLLM's adapter API from test_adapter_manager; one test runs the background
loop itself (started by `AdapterManager.start`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from fedpersona.adapters import AdapterStore, Slot
from fedpersona.adapters.refs import engine_adapter_name as adapter_name
from fedpersona.service.engine.adapters import AdapterManager
from fedpersona.service.engine.preload import AdapterPreloader
from fedpersona.service.engine.replica_set import ReplicaSet
from fedpersona.service.engine.replicas import rendezvous_order
from fedpersona.service.errors import AdapterLoadFailed
from test_adapter_manager import BASE, RecordingEngine, manager, publish, run, settle, store

__all__ = ["store"]  # the fixture, shared with test_adapter_manager


def name_of(store: AdapterStore, user: str) -> str:
    version = store.current(Slot.user_served(user))
    assert version is not None
    return adapter_name(user, version.id)


def by_hand(
    store: AdapterStore, engine: RecordingEngine, **kw: Any
) -> tuple[AdapterManager, AdapterPreloader]:
    """A manager whose preload rounds run only when the test calls `step`."""
    m = manager(store, engine, background=False, **kw)
    assert m.preloader is not None
    return m, m.preloader


async def ask(m: Any, user: str) -> str | None:
    async with m.use(user) as name:
        return name  # type: ignore[no-any-return]


def test_new_version_is_loaded_before_the_next_request(store: AdapterStore) -> None:
    engine = RecordingEngine()
    publish(store, "alice", 1)
    m, preloader = by_hand(store, engine, max_loaded=None, preload=4)

    async def main() -> None:
        old = await ask(m, "alice")
        publish(store, "alice", 2)
        new = name_of(store, "alice")
        assert await preloader.step(scan=False) == [new]  # a recently served user: no scan
        assert new in engine.registered
        await settle()
        assert engine.unloads() == [old]  # superseded, unloaded as a request would have
        loads = len(engine.loads())
        assert await ask(m, "alice") == new
        assert len(engine.loads()) == loads  # the request paid no load
        assert await preloader.step(scan=True) == []  # nothing new

    run(main())


def test_start_up_warms_the_most_recently_published_up_to_the_limit(
    store: AdapterStore,
) -> None:
    engine = RecordingEngine()
    for i, user in enumerate(["a", "b", "c", "d"]):
        publish(store, user, i)
    m, preloader = by_hand(store, engine, max_loaded=None, preload=2)

    async def main() -> None:
        assert await preloader.step(scan=True) == [name_of(store, "d"), name_of(store, "c")]
        assert await preloader.step(scan=True) == []  # full: a and b wait for room
        assert await ask(m, "d") == name_of(store, "d")
        assert engine.loads() == [name_of(store, "d"), name_of(store, "c")]
        assert await ask(m, "a") == name_of(store, "a")  # on demand, as before

    run(main())
    assert engine.unloads() == []


def test_a_bounded_engine_is_never_overfilled_nor_evicted_for_new_users(
    store: AdapterStore,
) -> None:
    engine = RecordingEngine()
    publish(store, "a", 1)
    publish(store, "b", 2)
    m, preloader = by_hand(store, engine, max_loaded=2, preload=10)
    assert m.preload_limit == 2  # never more than the engine's bound

    async def main() -> None:
        await ask(m, "a")
        await ask(m, "b")
        publish(store, "c", 3)
        assert await preloader.step(scan=True) == []  # full: c waits for its first request
        assert engine.unloads() == []
        publish(store, "a", 4)  # a's new version replaces a's old one, b stays
        assert await preloader.step(scan=False) == [name_of(store, "a")]
        await settle()
        assert sorted(m.loaded) == sorted([name_of(store, "a"), name_of(store, "b")])
        assert sorted(engine.registered) == sorted(m.loaded)

    run(main())


def test_no_preload_while_every_adapter_is_in_use(store: AdapterStore) -> None:
    engine = RecordingEngine()
    publish(store, "a", 1)
    m, preloader = by_hand(store, engine, max_loaded=1, preload=1)

    async def main() -> None:
        async with m.use("a"):  # a long stream
            publish(store, "a", 2)
            assert await preloader.step(scan=True) == []  # would go over the bound
            assert len(engine.registered) == 1
        assert await preloader.step(scan=True) == [name_of(store, "a")]  # now there is room
        await settle()
        assert list(engine.registered) == [name_of(store, "a")]

    run(main())


def test_a_refused_preload_leaves_serving_as_it_was(store: AdapterStore) -> None:
    engine = RecordingEngine()
    publish(store, "alice", 1)
    m, preloader = by_hand(store, engine, max_loaded=None, preload=4)

    async def main() -> None:
        old = await ask(m, "alice")
        publish(store, "alice", 2)
        bad = name_of(store, "alice")
        engine.refuse.add(bad)
        assert await preloader.step(scan=True) == []  # logged, not raised
        assert await preloader.step(scan=True) == []  # and not tried again
        assert engine.loads().count(bad) == 1
        assert m.loaded == [old] and engine.unloads() == []
        with pytest.raises(AdapterLoadFailed):  # the request is refused as without preloading
            await ask(m, "alice")
        engine.refuse.clear()
        assert await ask(m, "alice") == bad  # loaded on demand

    run(main())


def test_an_unreachable_engine_is_tried_again(store: AdapterStore) -> None:
    engine = RecordingEngine()
    publish(store, "alice", 1)
    _, preloader = by_hand(store, engine, max_loaded=None, preload=4)

    async def main() -> None:
        engine.down = True
        assert await preloader.step(scan=True) == []
        engine.down = False
        assert await preloader.step(scan=True) == [name_of(store, "alice")]

    run(main())


def test_an_engine_restart_preloads_again(store: AdapterStore) -> None:
    engine = RecordingEngine()
    publish(store, "alice", 1)
    m, preloader = by_hand(store, engine, max_loaded=None, preload=4)

    async def main() -> None:
        assert await preloader.step(scan=True) == [name_of(store, "alice")]
        engine.registered.clear()
        m.reset()
        assert await preloader.step(scan=True) == [name_of(store, "alice")]

    run(main())


def test_preloading_is_off_by_default(store: AdapterStore) -> None:
    engine = RecordingEngine()
    publish(store, "alice", 1)
    m = manager(store, engine, max_loaded=None)

    async def main() -> None:
        await ask(m, "alice")
        publish(store, "alice", 2)
        await asyncio.sleep(0.5)
        await m.aclose()

    run(main())
    assert len(engine.loads()) == 1


def test_start_runs_the_preloader_in_the_background(store: AdapterStore) -> None:
    engine = RecordingEngine()

    async def models() -> list[str]:
        return [BASE, *engine.registered]

    engine.models = models  # type: ignore[attr-defined]
    m = manager(store, engine, max_loaded=None, preload=4)

    async def main() -> None:
        await m.start()
        publish(store, "alice", 1)  # a trainer publishes a first version: nobody asked yet
        deadline = time.monotonic() + 30
        while name_of(store, "alice") not in engine.registered:
            assert time.monotonic() < deadline, "not preloaded"
            await asyncio.sleep(0.05)
        await m.aclose()

    run(main())
    assert engine.loads() == [name_of(store, "alice")]


def test_a_replica_set_warms_each_user_on_their_first_replica_only(
    store: AdapterStore,
) -> None:
    urls = ["http://r0:8000", "http://r1:8000"]
    engines: dict[str, RecordingEngine] = {}
    users = [f"user{i}" for i in range(8)]
    for i, user in enumerate(users):
        publish(store, user, i)

    def make_client(url: str) -> Any:
        engines[url] = RecordingEngine()
        return engines[url]

    replicas = ReplicaSet(
        make_client=make_client,
        make_adapters=lambda client: by_hand(store, client, max_loaded=None, preload=100)[0],
        urls=urls,
    )

    async def main() -> None:
        for replica in replicas.replicas:
            assert replica.adapters.preloader is not None
            await replica.adapters.preloader.step(scan=True)

    run(main())
    for url, engine in engines.items():
        home = {name_of(store, u) for u in users if rendezvous_order(u, urls)[0] == url}
        assert set(engine.registered) == home


class _StartedEngine:
    """What the app asks of an engine supervisor (embedded mode), for an engine already up."""

    state = "ready"

    def __init__(self) -> None:
        self.restart_hooks: list[Any] = []

    async def start(self) -> None:
        pass

    def on_restart(self, hook: Any) -> None:
        self.restart_hooks.append(hook)

    async def wait_ready(self) -> None:
        pass

    async def stop(self, grace_s: float = 0.0, *, wait_idle: Any = None) -> None:
        pass

    class launch:  # mirrors EngineSupervisor.launch
        base_url = "http://engine.invalid"


def test_an_embedded_engine_is_warmed_at_start_up_before_any_request(make_gateway: Any) -> None:
    # With the engine the gateway supervises nobody calls start(): the app's start-up starts
    # preloading itself, so the first users' first requests do not pay the loads.
    supervisor = _StartedEngine()
    gw = make_gateway(adapter_preload=4, supervisor=supervisor)
    deadline = time.monotonic() + 30
    while {name_of(gw.store, u) for u in ("alice", "bob")} - set(gw.engine.loaded):
        assert time.monotonic() < deadline, "the engine was not warmed at start-up"
        time.sleep(0.05)
    assert gw.engine.load_calls, "warmed by preloading"
    loads = len(gw.engine.load_calls)
    assert gw.chat("alice").status_code == 200
    assert len(gw.engine.load_calls) == loads  # the first request paid no load
    assert len(supervisor.restart_hooks) == 1  # an engine restart resets what is loaded


def test_the_gateway_preloads_a_published_version_before_any_request(make_gateway: Any) -> None:
    # The app wires the preloader from its settings. Without a supervisor or reconciliation
    # (an engine handed in), preloading starts with the first request.
    gw = make_gateway(adapter_preload=4)
    assert gw.chat("alice").status_code == 200
    deadline = time.monotonic() + 30
    while name_of(gw.store, "bob") not in gw.engine.loaded:  # warmed, never asked
        assert time.monotonic() < deadline, "bob was not preloaded"
        time.sleep(0.05)
    publish(gw.store, "alice", 7)  # a round publishes alice's next version
    new = name_of(gw.store, "alice")
    while new not in gw.engine.loaded:
        assert time.monotonic() < deadline, "alice's new version was not preloaded"
        time.sleep(0.05)
    loads = len(gw.engine.load_calls)
    assert gw.chat("alice").status_code == 200
    assert gw.chat("bob").status_code == 200
    assert gw.engine.last["model"] == name_of(gw.store, "bob")
    assert len(gw.engine.load_calls) == loads  # neither request paid a load


def test_a_publish_is_noticed_through_the_store_stamp_not_the_slow_polls(
    store: AdapterStore,
) -> None:
    """The store's publish stamp wakes the preloader: with the per-slot poll and the store scan
    both a minute apart, a new user's first version and a served user's next one are still
    loaded within a fraction of a second of their publish."""
    engine = RecordingEngine()

    async def models() -> list[str]:
        return [BASE, *engine.registered]

    engine.models = models  # type: ignore[attr-defined]
    m = manager(store, engine, max_loaded=None, preload=4)
    m.preloader = AdapterPreloader(m, store, notice_s=0.01, poll_s=60.0, scan_s=60.0)

    async def loaded_within(name: str, seconds: float) -> float:
        started = time.monotonic()
        while name not in engine.registered:
            assert time.monotonic() - started < seconds, f"{name} not preloaded in {seconds} s"
            await asyncio.sleep(0.01)
        return time.monotonic() - started

    async def main() -> None:
        await m.start()
        await asyncio.sleep(0.05)  # the start-up scan is done: the next one is a minute away
        publish(store, "alice", 1)  # a new user: only the stamp names them
        await loaded_within(name_of(store, "alice"), 2.0)
        await ask(m, "alice")
        publish(store, "alice", 2)  # a served user's next version
        await loaded_within(name_of(store, "alice"), 2.0)
        await m.aclose()

    run(main())
    assert len(engine.loads()) == 2  # neither request nor poll loaded anything


def test_the_publish_stamp_is_a_hint_a_publish_never_fails_on(
    store: AdapterStore, caplog: pytest.LogCaptureFixture
) -> None:
    from fedpersona.adapters.announce import STAMP_FILE, PublishWatch

    watch = PublishWatch(store.root)
    assert not watch.changed() and watch.last_slot() is None  # nothing published yet
    publish(store, "alice", 1)
    assert watch.changed() and not watch.changed()  # once per publish
    assert watch.last_slot() == Slot.user_served("alice")
    publish(store, "alice", 1)  # the same content again: nothing changes, no stamp
    assert not watch.changed()
    # The stamp cannot be written (a directory in its place): the publish still completes.
    (store.root / STAMP_FILE).unlink()
    (store.root / STAMP_FILE).mkdir()
    version = publish(store, "alice", 2)
    assert store.current_id(Slot.user_served("alice")) == version.id
    assert "publish stamp" in caplog.text
    assert watch.last_slot() is None


def test_without_the_stamp_watch_a_publish_waits_for_the_per_slot_poll(
    store: AdapterStore,
) -> None:
    """`adapter_publish_watch_s = 0` (e.g. a filesystem where the extra stat is unwanted): the
    preloader sees a new version only at its next poll."""
    from fedpersona.service.settings import Settings

    engine = RecordingEngine()

    async def models() -> list[str]:
        return [BASE, *engine.registered]

    engine.models = models  # type: ignore[attr-defined]
    m = manager(store, engine, max_loaded=None, preload=4, preload_notice_s=0)
    assert m.preloader is not None
    m.preloader = AdapterPreloader(m, store, notice_s=0, poll_s=60.0, scan_s=60.0)

    async def main() -> None:
        await m.start()
        await asyncio.sleep(0.05)
        publish(store, "alice", 1)
        await asyncio.sleep(0.5)
        assert not engine.registered  # the next poll is a minute away
        await m.aclose()

    run(main())
    with pytest.raises(ValueError, match="adapter_publish_watch_s"):
        Settings(adapter_publish_watch_s=-1)  # type: ignore[call-arg]


def test_preloads_are_counted_apart_from_loads_a_request_paid(store: AdapterStore) -> None:
    """`fedpersona_adapter_preloads_total` counts the loads made ahead of requests, so an
    operator (and the hot-swap benchmark) can tell how many loads a request waited for."""
    from fedpersona.service.metrics import Metrics

    engine = RecordingEngine()
    metrics = Metrics()
    publish(store, "alice", 1)
    m, preloader = by_hand(store, engine, max_loaded=None, preload=4, metrics=metrics)

    def sample(name: str) -> float | None:
        return metrics.registry.get_sample_value(name)

    async def main() -> None:
        await ask(m, "alice")  # on demand: a load the request paid
        publish(store, "alice", 2)
        await preloader.step(scan=False)  # ahead of the next request
        await ask(m, "alice")

    run(main())
    assert sample("fedpersona_adapter_loads_total") == 2
    assert sample("fedpersona_adapter_preloads_total") == 1
