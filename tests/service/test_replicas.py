"""Routing over vLLM replicas: the pure bounded-load rendezvous laws (Hypothesis), and
`ReplicaSet` over fake engines (affinity, spill-over, failover on unreachable replicas, 5xx
answers and streams that fail before their first line, no retry after it or on a 4xx, 404
reload, DNS discovery)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fake_engine import BASE_MODEL, FakeEngine
from fedpersona.adapters import AdapterStore, Slot
from fedpersona.adapters.refs import engine_adapter_name
from fedpersona.service.engine.adapters import AdapterManager
from fedpersona.service.engine.replica_set import ReplicaSet
from fedpersona.service.engine.replicas import (
    candidates,
    load_bound,
    owner,
    parse_host_port,
    rendezvous_order,
    replica_urls,
)
from fedpersona.service.errors import EngineRequestError, EngineUnavailable
from hypothesis import given, settings
from hypothesis import strategies as st
from support.lora import random_lora

names = st.text(alphabet="abcdefghij0123456789-", min_size=1, max_size=12)
replica_sets = st.lists(names, min_size=1, max_size=8, unique=True)

# ----------------------------------------------------------------------------- pure laws


@given(key=names, replicas=replica_sets, data=st.data())
def test_order_is_deterministic_and_independent_of_listing_order(
    key: str, replicas: list[str], data: st.DataObject
) -> None:
    shuffled = data.draw(st.permutations(replicas))
    assert rendezvous_order(key, replicas) == rendezvous_order(key, shuffled)
    assert sorted(rendezvous_order(key, replicas)) == sorted(replicas)


@given(
    key=names,
    replicas=replica_sets,
    loads=st.lists(st.integers(0, 50), min_size=8, max_size=8),
    factor=st.floats(1.0, 3.0),
)
def test_choice_is_always_below_the_load_bound(
    key: str, replicas: list[str], loads: list[int], factor: float
) -> None:
    load = dict(zip(replicas, loads, strict=False))
    order = candidates(key, replicas, load=load, factor=factor)
    bound = load_bound(sum(load.values()), len(replicas), factor)
    assert load[order[0]] < bound
    assert sorted(order) == sorted(replicas)  # every replica stays reachable for failover
    # It is the highest-ranked replica under the bound.
    ranked = rendezvous_order(key, replicas)
    assert order[0] == next(r for r in ranked if load[r] < bound)


@given(key=names, replicas=replica_sets)
def test_without_load_a_key_goes_home(key: str, replicas: list[str]) -> None:
    assert candidates(key, replicas, load={})[0] == owner(key, replicas)


@settings(max_examples=50)
@given(keys=st.lists(names, min_size=1, max_size=40, unique=True), replicas=replica_sets, new=names)
def test_a_joining_replica_takes_keys_only_for_itself(
    keys: list[str], replicas: list[str], new: str
) -> None:
    grown = [*replicas, new]
    for key in keys:
        assert owner(key, grown) in (owner(key, replicas), new)


@settings(max_examples=50)
@given(keys=st.lists(names, min_size=1, max_size=40, unique=True), replicas=replica_sets)
def test_a_leaving_replica_moves_only_its_own_keys(keys: list[str], replicas: list[str]) -> None:
    if len(replicas) < 2:
        return
    gone, rest = replicas[0], replicas[1:]
    for key in keys:
        if owner(key, replicas) != gone:
            assert owner(key, rest) == owner(key, replicas)


def test_keys_spread_evenly() -> None:
    replicas = [f"http://10.0.0.{i}:8000" for i in range(4)]
    counts = Counter(owner(f"user{i}", replicas) for i in range(4000))
    assert all(800 <= c <= 1200 for c in counts.values()), counts


def test_a_hot_key_spills_to_its_next_replica() -> None:
    replicas = ["a", "b", "c"]
    home, second, _ = rendezvous_order("hot", replicas)
    load = {home: 10, second: 0}
    assert candidates("hot", replicas, load=load)[0] == second


def test_addresses() -> None:
    assert parse_host_port("vllm-headless.ns.svc.cluster.local:8000") == (
        "vllm-headless.ns.svc.cluster.local",
        8000,
    )
    for bad in ("nohost", ":80", "host:x", "host:0"):
        with pytest.raises(ValueError):
            parse_host_port(bad)
    assert replica_urls(["10.0.0.2", "10.0.0.1", "10.0.0.2", "fd00::1"], 8000) == [
        "http://10.0.0.1:8000",
        "http://10.0.0.2:8000",
        "http://[fd00::1]:8000",
    ]


# ----------------------------------------------------------------------------- ReplicaSet


class Engine(FakeEngine):
    """FakeEngine plus what a replica set uses of `EngineClient` beyond it, and two more ways to
    fail: a stream that ends, or opens with `first_line`, before any chunk, and a health probe
    that fails while chats still get answers (`probe_ok`)."""

    in_flight = 0
    empty_stream = False
    first_line: bytes | None = None
    probe_ok: bool | None = None

    async def _stream(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        if self.empty_stream or self.first_line is not None:
            self._admit(body)
            if self.first_line is not None:
                yield self.first_line
            return
        async for line in super()._stream(body):
            yield line

    async def health(self) -> bool:
        return await super().health() if self.probe_ok is None else self.probe_ok

    async def models(self) -> list[str]:
        if self.down:
            raise EngineUnavailable()
        return [BASE_MODEL, *self.loaded]

    async def wait_idle(self, timeout: float) -> bool:
        return True


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    store = AdapterStore(tmp_path / "store", max_rank=16)
    for i in range(12):
        lora = random_lora(
            seed=i, r=8, targets=("q_proj",), layers=(0,), base_model=BASE_MODEL, scale=1.0
        )
        store.publish_lora(Slot.user_served(f"user{i}"), lora)
    return store


def replica_set(
    store: AdapterStore, urls: list[str], **kw: Any
) -> tuple[ReplicaSet, dict[str, Engine]]:
    engines: dict[str, Engine] = {}

    def make_client(url: str) -> Any:
        engines[url] = Engine(reply=f"from {url}")
        return engines[url]

    def make_adapters(client: Any) -> AdapterManager:
        return AdapterManager(store=store, engine=client, max_loaded=None)

    return ReplicaSet(
        make_client=make_client, make_adapters=make_adapters, urls=urls, **kw
    ), engines


def served(store: AdapterStore, user: str) -> str:
    version = store.current(Slot.user_served(user))
    assert version is not None
    return engine_adapter_name(user, version.id)


async def ask(replicas: ReplicaSet, user: str, *, stream: bool = False) -> str:
    async with replicas.use(user) as name:
        body = {"model": name or BASE_MODEL, "messages": []}
        if not stream:
            return str((await replicas.chat(body))["choices"][0]["message"]["content"])
        lines = [line async for line in replicas.stream_chat(body)]
        assert lines[-1] == b"data: [DONE]"
        return "".join(str(line) for line in lines)


URLS = ["http://r0:8000", "http://r1:8000", "http://r2:8000"]


def test_each_user_sticks_to_their_home_replica(store: AdapterStore) -> None:
    replicas, engines = replica_set(store, URLS)

    async def main() -> None:
        for _ in range(3):
            for i in range(12):
                user = f"user{i}"
                answer = await ask(replicas, user)
                assert answer == f"from {owner(user, URLS)}"

    asyncio.run(main())
    for url, engine in engines.items():
        mine = {served(store, f"user{i}") for i in range(12) if owner(f"user{i}", URLS) == url}
        assert set(engine.loaded) == mine  # each adapter loaded once, where its user goes
        assert len(engine.load_calls) == len(mine)


def test_failover_loses_no_request(store: AdapterStore) -> None:
    replicas, engines = replica_set(store, URLS)

    async def main() -> None:
        for i in range(12):
            await ask(replicas, f"user{i}")
        engines[URLS[0]].down = True  # killed: its users move to their next replica
        for i in range(12):
            for stream in (False, True):
                assert "http://r0" not in await ask(replicas, f"user{i}", stream=stream)
        assert not replicas.replicas[0].healthy
        # Base-model requests fail over too.
        async with replicas.use("nobody-has-this") as name:
            assert name is None
        assert (await replicas.chat({"model": BASE_MODEL, "messages": []}))["model"] == BASE_MODEL
        # It comes back: probed healthy, its users return home, their adapters reloaded.
        engines[URLS[0]].down = False
        engines[URLS[0]].loaded.clear()
        await replicas.refresh()
        for i in range(12):
            user = f"user{i}"
            assert await ask(replicas, user) == f"from {owner(user, URLS)}"

    asyncio.run(main())


def test_all_replicas_down_is_unavailable(store: AdapterStore) -> None:
    replicas, engines = replica_set(store, URLS[:2])
    for engine in engines.values():
        engine.down = True

    async def main() -> None:
        with pytest.raises(EngineUnavailable):
            await ask(replicas, "user1")

    asyncio.run(main())


def test_a_lost_adapter_is_reloaded_in_place_and_the_request_retried(store: AdapterStore) -> None:
    replicas, engines = replica_set(store, URLS)
    user = "user3"
    home = engines[str(owner(user, URLS))]

    async def main() -> None:
        await ask(replicas, user)
        home.loaded.clear()  # restarted behind our back, or another gateway unloaded it
        await ask(replicas, user)
        await ask(replicas, user, stream=True)

    asyncio.run(main())
    assert [n for n, _ in home.load_calls] == [served(store, user)] * 2


def test_a_hot_user_spills_over_and_loads_there_too(store: AdapterStore) -> None:
    replicas, engines = replica_set(store, URLS)
    user = "user5"

    async def main() -> set[str]:
        # 9 concurrent pinned requests of one user: the bound (1.25 * n / 3) sends some away.
        answers = set()
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(slow(user)) for _ in range(9)]
        for task in tasks:
            answers.add(task.result())
        return answers

    async def slow(u: str) -> str:
        async with replicas.use(u) as name:
            await asyncio.sleep(0.05)
            answer = await replicas.chat({"model": name, "messages": []})
            return str(answer["choices"][0]["message"]["content"])

    answers = asyncio.run(main())
    assert len(answers) >= 2
    assert sum(served(store, user) in e.loaded for e in engines.values()) == len(answers)


def test_dns_discovery_adds_and_retires_replicas(store: AdapterStore) -> None:
    addresses = ["10.0.0.1", "10.0.0.2"]

    async def resolve(host: str, port: int) -> list[str]:
        assert (host, port) == ("vllm-headless", 8000)
        return list(addresses)

    replicas, engines = replica_set(store, [], dns=("vllm-headless", 8000), resolve=resolve)

    async def main() -> None:
        await replicas.start()
        assert sorted(r.url for r in replicas.replicas) == [
            "http://10.0.0.1:8000",
            "http://10.0.0.2:8000",
        ]
        addresses[:] = ["10.0.0.2", "10.0.0.3"]
        await replicas.refresh()
        assert sorted(r.url for r in replicas.replicas) == [
            "http://10.0.0.2:8000",
            "http://10.0.0.3:8000",
        ]
        for i in range(12):
            assert "10.0.0.1" not in await ask(replicas, f"user{i}")
        await replicas.aclose()

    asyncio.run(main())
    assert engines["http://10.0.0.1:8000"].closed


def test_settings_with_replicas_build_a_replica_set(tmp_path: Path) -> None:
    from fedpersona.service.http.app import create_app
    from gateway_harness import make_settings
    from pydantic import ValidationError

    settings = make_settings(tmp_path, replicas=URLS)
    assert not settings.engine.supervised and settings.replica_routing
    app = create_app(settings)
    assert isinstance(app.state.services.adapters, ReplicaSet)
    assert app.state.services.engine is app.state.services.adapters
    assert [r.url for r in app.state.services.adapters.replicas] == URLS
    dns = make_settings(tmp_path, replicas_dns="vllm-headless.ns.svc.cluster.local:8000")
    assert dns.engine.url == "http://vllm-headless.ns.svc.cluster.local:8000"
    with pytest.raises(ValidationError):
        make_settings(tmp_path, replicas_dns="no-port")


# ----------------------------------------------------------------------------- failover


def home_and_next(user: str, engines: dict[str, Engine]) -> tuple[Engine, Engine]:
    first, second, *_ = rendezvous_order(user, URLS)
    return engines[first], engines[second]


def by(engine: Engine, answer: str) -> bool:
    """Whether `engine` wrote `answer` (whole, or streamed token by token)."""
    return engine.reply.removeprefix("from ") in answer


def unavailable() -> EngineRequestError:
    return EngineRequestError(503, {"error": {"message": "no", "type": "x", "code": 503}})


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("status", [502, 503, 504])
def test_a_5xx_fails_over_with_the_adapter_loaded_and_marks_the_replica_down(
    store: AdapterStore, status: int, stream: bool
) -> None:
    replicas, engines = replica_set(store, URLS)
    user = "user4"
    home, fallback = home_and_next(user, engines)
    home.error = EngineRequestError(status, {"error": {"message": "down", "code": status}})

    async def main() -> None:
        answer = await ask(replicas, user, stream=stream)
        assert by(fallback, answer) and not by(home, answer)
        assert len(home.received) == 1 and len(fallback.received) == 1
        # On the new replica: the user's own adapter, loaded there by that replica's manager.
        assert fallback.last["model"] == served(store, user)
        assert served(store, user) in fallback.loaded
        # Later requests skip the failed replica until its health probe passes.
        await ask(replicas, user, stream=stream)
        assert len(home.received) == 1 and len(fallback.received) == 2
        home.error = None
        await replicas.refresh()
        assert by(home, await ask(replicas, user, stream=stream))

    asyncio.run(main())
    assert all(r.active == 0 for r in replicas.replicas)  # every pin released


@pytest.mark.parametrize("first_line", [None, b'data: {"error":{"message":"dead","code":500}}'])
def test_a_stream_that_ends_or_errors_before_its_first_chunk_fails_over(
    store: AdapterStore, first_line: bytes | None
) -> None:
    replicas, engines = replica_set(store, URLS)
    user = "user7"
    home, fallback = home_and_next(user, engines)
    home.empty_stream = first_line is None
    home.first_line = first_line
    home.probe_ok = False  # a 500 counts as the replica's failure only when it fails its probe

    async def main() -> None:
        answer = await ask(replicas, user, stream=True)
        assert by(fallback, answer) and "dead" not in answer
        assert fallback.last["model"] == served(store, user)
        assert not replicas.replicas[URLS.index(home_url(engines, home))].healthy

    asyncio.run(main())


def home_url(engines: dict[str, Engine], engine: Engine) -> str:
    return next(url for url, e in engines.items() if e is engine)


def test_a_reset_before_the_first_chunk_fails_over(store: AdapterStore) -> None:
    replicas, engines = replica_set(store, URLS)
    user = "user2"
    home, fallback = home_and_next(user, engines)
    home.fail_stream_after = 0  # the connection drops before the first chunk

    async def main() -> None:
        assert by(fallback, await ask(replicas, user, stream=True))

    asyncio.run(main())
    assert home.streams_closed == 1


def test_a_stream_that_dies_after_its_first_chunk_is_not_retried(store: AdapterStore) -> None:
    replicas, engines = replica_set(store, URLS)
    user = "user1"
    home, _ = home_and_next(user, engines)
    home.fail_stream_after = 2

    async def main() -> list[bytes]:
        got: list[bytes] = []
        async with replicas.use(user) as name:
            with pytest.raises(EngineUnavailable):
                async for line in replicas.stream_chat({"model": name, "messages": []}):
                    got.append(line)
        return got

    got = asyncio.run(main())
    assert len(got) == 2  # what the client already had; the error follows, not a second answer
    assert sum(len(e.received) for e in engines.values()) == 1


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("status", [400, 422, 429])
def test_a_4xx_is_never_retried(store: AdapterStore, status: int, stream: bool) -> None:
    replicas, engines = replica_set(store, URLS)
    user = "user6"
    home, _ = home_and_next(user, engines)
    home.error = EngineRequestError(status, {"error": {"message": "bad", "code": status}})

    async def main() -> None:
        with pytest.raises(EngineRequestError) as raised:
            await ask(replicas, user, stream=stream)
        assert raised.value.status == status

    asyncio.run(main())
    assert sum(len(e.received) for e in engines.values()) == 1
    assert all(r.healthy for r in replicas.replicas)


def test_a_500_from_a_healthy_replica_is_the_requests_own(store: AdapterStore) -> None:
    replicas, engines = replica_set(store, URLS)
    user = "user8"
    home, _ = home_and_next(user, engines)
    home.error = EngineRequestError(500, {"error": {"message": "bug", "code": 500}})

    async def main() -> None:
        with pytest.raises(EngineRequestError):
            await ask(replicas, user)
        home.probe_ok = False  # the same 500 from a dying engine: fail over
        assert not by(home, await ask(replicas, user))

    asyncio.run(main())


def test_each_replica_is_tried_at_most_once(store: AdapterStore) -> None:
    replicas, engines = replica_set(store, URLS)
    for engine in engines.values():
        engine.error = unavailable()

    async def main() -> None:
        with pytest.raises(EngineRequestError) as raised:
            await ask(replicas, "user9", stream=True)
        assert raised.value.status == 503

    asyncio.run(main())
    assert [len(e.received) for e in engines.values()] == [1, 1, 1]
    assert not any(r.healthy for r in replicas.replicas)


def test_an_adapter_load_the_replica_fails_with_a_5xx_fails_over(store: AdapterStore) -> None:
    replicas, engines = replica_set(store, URLS)
    user = "user10"
    home, fallback = home_and_next(user, engines)

    async def refuse(name: str, path: str, *, replace: bool = False) -> None:
        raise unavailable()

    home.load_lora = refuse  # type: ignore[method-assign]

    async def main() -> None:
        assert by(fallback, await ask(replicas, user))
        assert fallback.last["model"] == served(store, user)

    asyncio.run(main())
