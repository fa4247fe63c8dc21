"""AdapterManager against a real AdapterStore and a recording fake of vLLM's adapter API.

The fake keeps vLLM's rules that matter here: a name can be registered once unless loaded in
place, unloading an unknown name is a 404, and loads can be held open (to create races) or made
to fail.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from fedpersona.adapters import AdapterStore, LoraAdapter, Slot, Version
from fedpersona.adapters.refs import engine_adapter_name as adapter_name
from fedpersona.service.engine.adapters import AdapterManager
from fedpersona.service.errors import AdapterLoadFailed, EngineRequestError, EngineUnavailable
from fedpersona.service.metrics import Metrics
from support.lora import random_lora

T = TypeVar("T")
BASE = "fedpersona-test-base"


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class RecordingEngine:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.registered: dict[str, str] = {}
        self.hold: asyncio.Event | None = None
        self.refuse: set[str] = set()  # names whose load fails like a bad adapter
        self.down = False

    async def load_lora(self, name: str, path: str, *, replace: bool = False) -> None:
        self.calls.append(("load!" if replace else "load", name))
        if self.hold is not None:
            await self.hold.wait()
        if self.down:
            raise EngineUnavailable()
        if name in self.refuse:
            raise EngineRequestError(500, {"error": {"message": "bad adapter", "code": 500}})
        if name in self.registered and not replace:
            raise EngineRequestError(400, {"error": {"message": "already loaded", "code": 400}})
        assert Path(path, "adapter_config.json").is_file()
        self.registered[name] = path

    async def unload_lora(self, name: str) -> None:
        self.calls.append(("unload", name))
        if self.down:
            raise EngineUnavailable()
        if self.registered.pop(name, None) is None:
            raise EngineRequestError(404, {"error": {"message": "not found", "code": 404}})

    def loads(self) -> list[str]:
        return [n for op, n in self.calls if op.startswith("load")]

    def unloads(self) -> list[str]:
        return [n for op, n in self.calls if op == "unload"]


def lora(seed: int) -> LoraAdapter:
    return random_lora(seed=seed, r=8, targets=("q_proj",), layers=(0,), base_model=BASE, scale=1.0)


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    return AdapterStore(tmp_path / "store", max_rank=16)


def publish(store: AdapterStore, user: str, seed: int) -> Version:
    return store.publish_lora(Slot.user_served(user), lora(seed))


def manager(store: AdapterStore, engine: RecordingEngine, **kw: Any) -> AdapterManager:
    kw.setdefault("max_loaded", 4)
    return AdapterManager(store=store, engine=engine, **kw)  # type: ignore[arg-type]


async def settle() -> None:
    """Let background unload tasks run."""
    for _ in range(10):
        await asyncio.sleep(0)


def test_user_without_adapter_gets_base_model(store: AdapterStore) -> None:
    engine = RecordingEngine()

    async def main() -> str | None:
        async with manager(store, engine).use("nobody") as name:
            return name

    assert run(main()) is None
    assert engine.calls == []


def test_loads_once_and_reuses(store: AdapterStore) -> None:
    engine = RecordingEngine()
    v = publish(store, "alice", 1)
    m = manager(store, engine)

    async def main() -> list[str | None]:
        names = []
        for _ in range(3):
            async with m.use("alice") as name:
                names.append(name)
        return names

    assert run(main()) == [f"u-alice-{v.id}"] * 3
    assert engine.loads() == [f"u-alice-{v.id}"]
    assert engine.registered[f"u-alice-{v.id}"] == str(v.path)


def test_new_version_is_served_next_request_and_old_one_unloaded(store: AdapterStore) -> None:
    engine = RecordingEngine()
    v1 = publish(store, "alice", 1)
    m = manager(store, engine)

    async def main() -> tuple[str | None, str | None]:
        async with m.use("alice") as first:
            pass
        publish(store, "alice", 2)
        async with m.use("alice") as second:
            pass
        await settle()
        return first, second

    first, second = run(main())
    v2 = store.current(Slot.user_served("alice"))
    assert v2 is not None and v2.id != v1.id
    assert (first, second) == (adapter_name("alice", v1.id), adapter_name("alice", v2.id))
    assert engine.unloads() == [first]
    assert list(engine.registered) == [second]
    assert m.loaded == [second]


def test_superseded_version_stays_until_its_requests_finish(store: AdapterStore) -> None:
    engine = RecordingEngine()
    v1 = publish(store, "alice", 1)
    m = manager(store, engine)
    old = adapter_name("alice", v1.id)

    async def main() -> None:
        async with m.use("alice") as name:  # a long stream on v1
            assert name == old
            publish(store, "alice", 2)
            async with m.use("alice") as newer:
                assert newer != old
            await settle()
            assert engine.unloads() == []  # still streaming from v1
            assert old in engine.registered
        await settle()
        assert engine.unloads() == [old]

    run(main())


def test_lru_eviction_order(store: AdapterStore) -> None:
    engine = RecordingEngine()
    ids = {u: publish(store, u, i).id for i, u in enumerate(["a", "b", "c", "d"])}
    m = manager(store, engine, max_loaded=2)

    async def use(user: str) -> None:
        async with m.use(user):
            pass

    async def main() -> None:
        await use("a")
        await use("b")
        await use("a")  # a is now more recent than b
        await use("c")  # evicts b
        await use("d")  # evicts a
        await settle()

    run(main())
    assert engine.unloads() == [adapter_name("b", ids["b"]), adapter_name("a", ids["a"])]
    assert m.loaded == [adapter_name("c", ids["c"]), adapter_name("d", ids["d"])]
    assert sorted(engine.registered) == sorted(m.loaded)


def test_adapters_in_use_are_never_evicted(store: AdapterStore) -> None:
    engine = RecordingEngine()
    ids = {u: publish(store, u, i).id for i, u in enumerate(["a", "b"])}
    m = manager(store, engine, max_loaded=1)

    async def main() -> None:
        async with m.use("a"):
            async with m.use("b"):
                # Both pinned: the bound is exceeded rather than breaking a request.
                assert len(engine.registered) == 2
                assert engine.unloads() == []
            await settle()
            # b finished; a is still in use, so b (idle) is the one trimmed.
            assert engine.unloads() == [adapter_name("b", ids["b"])]
        await settle()
        assert m.loaded == [adapter_name("a", ids["a"])]

    run(main())


def test_concurrent_first_requests_load_once(store: AdapterStore) -> None:
    engine = RecordingEngine()
    v = publish(store, "alice", 1)
    m = manager(store, engine)

    async def one() -> str | None:
        async with m.use("alice") as name:
            await asyncio.sleep(0)
            return name

    async def main() -> list[str | None]:
        engine.hold = asyncio.Event()
        tasks = [asyncio.create_task(one()) for _ in range(20)]
        await settle()
        engine.hold.set()
        return await asyncio.gather(*tasks)

    names = run(main())
    assert names == [adapter_name("alice", v.id)] * 20
    assert engine.loads() == [adapter_name("alice", v.id)]


def test_load_failure_fails_request_and_leaves_state_consistent(store: AdapterStore) -> None:
    engine = RecordingEngine()
    v = publish(store, "alice", 1)
    name = adapter_name("alice", v.id)
    engine.refuse.add(name)
    metrics = Metrics()
    m = manager(store, engine, metrics=metrics)

    async def main() -> str | None:
        with pytest.raises(AdapterLoadFailed):
            async with m.use("alice"):
                pytest.fail("the body must not run when the load failed")
        assert m.loaded == []
        engine.refuse.clear()  # the operator fixed the engine; the next request succeeds
        async with m.use("alice") as got:
            return got

    assert run(main()) == name
    assert engine.loads() == [name, name]
    assert metrics.registry.get_sample_value("fedpersona_adapter_loads_total") == 1


def test_engine_down_during_load_is_unavailable_not_load_failure(store: AdapterStore) -> None:
    engine = RecordingEngine()
    publish(store, "alice", 1)
    engine.down = True
    m = manager(store, engine)

    async def main() -> None:
        with pytest.raises(EngineUnavailable):
            async with m.use("alice"):
                pass

    run(main())
    assert m.loaded == []


def test_reset_after_engine_restart_loads_again(store: AdapterStore) -> None:
    engine = RecordingEngine()
    v = publish(store, "alice", 1)
    m = manager(store, engine)

    async def use() -> None:
        async with m.use("alice"):
            pass

    async def main() -> None:
        await use()
        engine.registered.clear()  # vLLM restarted and lost everything
        m.reset()
        await use()

    run(main())
    assert engine.loads() == [adapter_name("alice", v.id)] * 2


def test_engine_404_for_loaded_name_forgets_it(store: AdapterStore) -> None:
    engine = RecordingEngine()
    v = publish(store, "alice", 1)
    name = adapter_name("alice", v.id)
    m = manager(store, engine)

    async def main() -> None:
        with pytest.raises(EngineRequestError):
            async with m.use("alice"):
                engine.registered.clear()  # an external vLLM restarted behind our back
                raise EngineRequestError(404, {"error": {"message": "no such model"}})
        assert m.loaded == []
        async with m.use("alice") as again:
            assert again == name

    run(main())
    # Reloaded in place: if vLLM did still hold the name, a plain load would be refused.
    assert engine.calls == [("load", name), ("load!", name)]


def test_metrics_count_loads_unloads_evictions(store: AdapterStore) -> None:
    engine = RecordingEngine()
    for i, u in enumerate(["a", "b", "c"]):
        publish(store, u, i)
    metrics = Metrics()
    m = manager(store, engine, max_loaded=1, metrics=metrics)

    async def main() -> None:
        for u in ["a", "b", "c"]:
            async with m.use(u):
                pass
        publish(store, "c", 9)
        async with m.use("c"):
            pass
        await settle()

    run(main())
    value = metrics.registry.get_sample_value
    assert value("fedpersona_adapter_loads_total") == 4
    # a and b evicted; c's old version unloaded as superseded (not an eviction).
    assert value("fedpersona_adapter_unloads_total") == 3
    assert value("fedpersona_adapter_evictions_total") == 2
    assert value("fedpersona_adapter_load_seconds_count") == 4


def test_rejects_nonpositive_capacity(store: AdapterStore) -> None:
    with pytest.raises(ValueError, match="max_loaded"):
        manager(store, RecordingEngine(), max_loaded=0)


def test_name_left_registered_by_a_previous_gateway_is_loaded_in_place(
    store: AdapterStore,
) -> None:
    engine = RecordingEngine()
    v = publish(store, "alice", 1)
    name = adapter_name("alice", v.id)
    engine.registered[name] = "/from/an/earlier/gateway/process"

    async def main() -> str | None:
        async with manager(store, engine).use("alice") as got:
            return got

    assert run(main()) == name
    assert engine.calls == [("load", name), ("load!", name)]
    assert engine.registered[name] == str(v.path)


def test_store_manifest_is_read_only_when_it_changed(
    store: AdapterStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = RecordingEngine()
    publish(store, "alice", 1)
    reads: list[str] = []
    real_current = store.current

    def counting_current(slot: Slot) -> Version | None:
        reads.append(slot.path)
        return real_current(slot)

    monkeypatch.setattr(store, "current", counting_current)
    m = manager(store, engine)

    async def use() -> str | None:
        async with m.use("alice") as name:
            return name

    async def main() -> tuple[list[str | None], list[str | None]]:
        before = [await use() for _ in range(3)]
        assert len(reads) == 1
        v2 = publish(store, "alice", 2)  # same second as the first publish: a new inode
        reads.clear()  # publishing reads the manifest itself
        after = [await use() for _ in range(3)]
        assert len(reads) == 1
        assert after[0] == adapter_name("alice", v2.id)
        return before, after

    before, after = run(main())
    # One manifest read per published version, not one per request.
    assert len(set(before)) == 1 and len(set(after)) == 1 and before[0] != after[0]


# --------------------------------------------------------------------------- cold start


def test_user_without_adapter_gets_the_newest_global_adapter(store: AdapterStore) -> None:
    engine = RecordingEngine()
    older = store.publish_lora(Slot.global_adapter("fedavg"), lora(1))
    newer = store.publish_lora(Slot.global_adapter("pftt"), lora(2))
    assert newer.created_at >= older.created_at
    adapters = manager(store, engine)

    async def main() -> list[str | None]:
        names = []
        async with adapters.use("newcomer") as name:
            names.append(name)
        own = publish(store, "newcomer", 3)  # their first personal round lands
        async with adapters.use("newcomer") as name:
            names.append(name)
        names.append(adapter_name("newcomer", own.id))
        return names

    cold, personal, expected = run(main())
    assert cold == adapter_name("newcomer", newer.id)
    assert personal == expected  # and the global is no longer theirs


def test_cold_start_follows_the_deployments_method(store: AdapterStore) -> None:
    engine = RecordingEngine()
    mine = store.publish_lora(Slot.global_adapter("fedavg"), lora(1))
    store.publish_lora(Slot.global_adapter("pftt"), lora(2))  # newer, another method's

    async def main() -> str | None:
        async with manager(store, engine, cold_start_method="fedavg").use("newcomer") as name:
            return name

    assert run(main()) == adapter_name("newcomer", mine.id)


def test_cold_start_through_the_gateway(make_gateway: Any) -> None:
    gw = make_gateway()
    glob = gw.store.publish_lora(Slot.global_adapter("pftt"), lora(5))
    response = gw.chat("carol")  # carol has no adapter of her own
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "personal"
    assert gw.engine.last["model"] == adapter_name("carol", glob.id)
    assert gw.engine.loaded[adapter_name("carol", glob.id)] == str(glob.path)


# --------------------------------------------------------------------------- shared engines


def test_two_gateways_on_one_engine_never_evict_each_others_adapters(tmp_path: Path) -> None:
    """Reproduces the cross-gateway eviction: with a per-gateway LRU bound, gateway B serving
    other users unloads alice's adapter from the shared engine and gateway A's next alice
    request fails (503). A gateway on a separately run engine leaves capacity to vLLM's LRU."""
    from fake_engine import FakeEngine
    from fastapi.testclient import TestClient
    from fedpersona.service.http.app import create_app
    from fedpersona.service.registry import Registry
    from gateway_harness import make_settings

    store = AdapterStore(tmp_path / "store", max_rank=16)
    users = ("alice", "bob", "carol", "dave")
    for i, user in enumerate(users):
        publish(store, user, i)

    def two_gateways(
        engine: FakeEngine, *, shared: bool
    ) -> list[tuple[TestClient, dict[str, str]]]:
        built = []
        for g in ("a", "b"):
            engine_settings = {"max_loras": 1, "max_cpu_loras": 1, "served_model_name": BASE}
            if shared:
                engine_settings["url"] = "http://vllm.invalid:8000"
            settings = make_settings(
                tmp_path / f"{g}-{shared}", store_dir=tmp_path / "store", engine=engine_settings
            )
            registry = Registry(settings.registry_file)
            keys = {}
            for user in users:
                registry.create_user(user)
                keys[user] = registry.issue_key(user).api_key
            app = create_app(settings, engine=engine, store=store, registry=registry)  # type: ignore[arg-type]
            built.append((TestClient(app), keys))
        return built

    def chat(gw: tuple[TestClient, dict[str, str]], user: str) -> int:
        client, keys = gw
        body = {"model": "personal", "messages": [{"role": "user", "content": "hi"}]}
        auth = {"Authorization": f"Bearer {keys[user]}"}
        return client.post("/v1/chat/completions", json=body, headers=auth).status_code

    for shared, expected in ((False, 503), (True, 200)):
        engine = FakeEngine()
        engine.models = lambda e=engine: _names(e)  # type: ignore[method-assign]
        a, b = two_gateways(engine, shared=shared)
        with a[0], b[0]:
            assert chat(a, "alice") == 200
            assert chat(b, "alice") == 200  # B registers the same content-named version
            for user in ("bob", "carol", "dave"):
                assert chat(b, user) == 200
            assert chat(a, "alice") == expected, f"shared={shared}"
        if shared:
            assert engine.unload_calls == []


async def _names(engine: Any) -> list[str]:
    return [BASE, *engine.loaded]


def test_unbounded_manager_never_unloads_for_capacity(store: AdapterStore) -> None:
    engine = RecordingEngine()
    for i, u in enumerate("abcdef"):
        publish(store, u, i)
    m = manager(store, engine, max_loaded=None)

    async def main() -> None:
        for u in "abcdef":
            async with m.use(u):
                pass
        await settle()

    run(main())
    assert engine.unloads() == []
    assert len(engine.registered) == 6


def test_superseded_version_is_unloaded_only_after_the_grace(store: AdapterStore) -> None:
    engine = RecordingEngine()
    v1 = publish(store, "alice", 1)
    m = manager(store, engine, max_loaded=None, unload_grace_s=0.2)

    async def main() -> None:
        async with m.use("alice"):
            pass
        publish(store, "alice", 2)
        async with m.use("alice"):
            pass
        await asyncio.sleep(0.05)
        assert engine.unloads() == []  # another gateway may still be sending v1
        await asyncio.sleep(0.3)
        assert engine.unloads() == [adapter_name("alice", v1.id)]

    run(main())


def test_start_adopts_current_versions_and_unloads_superseded_ones(store: AdapterStore) -> None:
    engine = RecordingEngine()
    old = publish(store, "alice", 1)
    new = publish(store, "alice", 2)
    bob = publish(store, "bob", 3)
    for name in (adapter_name("alice", old.id), adapter_name("alice", new.id)):
        engine.registered[name] = "/left/by/another/gateway"
    engine.registered[adapter_name("bob", bob.id)] = str(bob.path)
    engine.registered["someone-elses-model"] = "/x"

    async def models() -> list[str]:
        return [BASE, *engine.registered]

    engine.models = models  # type: ignore[attr-defined]
    m = manager(store, engine, max_loaded=None)

    async def main() -> list[str | None]:
        await m.start()
        await settle()
        names = []
        for user in ("alice", "bob"):
            async with m.use(user) as name:
                names.append(name)
        return names

    assert run(main()) == [adapter_name("alice", new.id), adapter_name("bob", bob.id)]
    assert engine.unloads() == [adapter_name("alice", old.id)]
    assert engine.loads() == []  # adopted, not reloaded
    assert "someone-elses-model" in engine.registered


def test_start_leaves_an_unreachable_engine_alone(store: AdapterStore) -> None:
    engine = RecordingEngine()

    async def models() -> list[str]:
        raise EngineUnavailable()

    engine.models = models  # type: ignore[attr-defined]
    m = manager(store, engine, max_loaded=None)
    run(m.start())
    assert m.loaded == [] and engine.calls == []


def test_invalidate_makes_the_next_use_reload_in_place(store: AdapterStore) -> None:
    engine = RecordingEngine()
    v = publish(store, "alice", 1)
    name = adapter_name("alice", v.id)
    m = manager(store, engine, max_loaded=None)

    async def main() -> None:
        async with m.use("alice"):
            pass
        m.invalidate(name)
        async with m.use("alice") as again:
            assert again == name

    run(main())
    assert engine.calls == [("load", name), ("load!", name)]
