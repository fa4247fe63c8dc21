"""The load client (`fedpersona.service.load`) and its smoke run: 50 users for 10 s through two
real gateway apps over two engine replicas (stub engines that answer at once), zero errors.

The gateways are the full app built from settings alone (`replicas=[...]`, adapter-affinity
routing), serving real published adapters from one store; every answer must come from the
asking user's own adapter, and both replicas must serve. Pure parts (popularity, arrivals,
quantiles, the keys file) are checked on their own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
from fake_engine import BASE_MODEL
from fedpersona.adapters import AdapterStore, Slot
from fedpersona.service.commands import load as load_command
from fedpersona.service.http.app import create_app
from fedpersona.service.load.client import (
    Caller,
    Workload,
    pick,
    poisson_arrivals,
    popularity_weights,
    run_load,
)
from fedpersona.service.load.stub_engine import StubState, stub_engine_app
from fedpersona.service.registry import Registry
from gateway_harness import make_settings, tiny_lora
from support.servers import serve_in_thread

USERS = [f"user{i:02d}" for i in range(50)]


def main(argv: list[str]) -> int:
    """`fedpersona load ARGV` (its own parser: the test does not depend on other commands)."""
    parser = argparse.ArgumentParser()
    load_command.add_arguments(parser)
    return load_command.run(parser.parse_args(argv[1:]))


@dataclass
class Deployment:
    gateways: list[str]
    stubs: list[StubState]
    keys: dict[str, str]
    served: dict[str, str]  # user -> "users/<user>/served@<version id>"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    home = tmp_path_factory.mktemp("load")
    store = AdapterStore(home / "store", max_rank=16)
    served = {}
    for seed, user in enumerate(USERS):
        slot = Slot.user_served(user)
        served[user] = f"{slot.path}@{store.publish_lora(slot, tiny_lora(seed=seed)).id}"
    with ExitStack() as stack:
        stubs = [StubState(), StubState()]
        urls = [
            stack.enter_context(serve_in_thread(stub_engine_app(model=BASE_MODEL, state=s)))
            for s in stubs
        ]
        roots, keys = [], {}
        for g in ("a", "b"):
            settings = make_settings(
                home / g, store_dir=home / "store", replicas=urls, replicas_refresh_s=0.5
            )
            registry = Registry(settings.registry_file)
            for user in USERS:
                registry.create_user(user)
                keys[f"{g}:{user}"] = registry.issue_key(user).api_key
            app = create_app(settings, registry=registry)
            roots.append(stack.enter_context(serve_in_thread(app, name=f"gateway-{g}")))
        yield Deployment(roots, stubs, keys, served)


def test_smoke_50_users_10_s_two_gateways_two_replicas(deployment: Deployment) -> None:
    workload = Workload(duration_s=10, concurrency=8, popularity="zipf", max_tokens=16, seed=1)
    before = [sum(s.requests.values()) for s in deployment.stubs]
    results = []
    for g, root in zip(("a", "b"), deployment.gateways, strict=True):
        callers = [Caller(u, deployment.keys[f"{g}:{u}"]) for u in USERS]
        half = Workload(**{**workload.__dict__, "duration_s": workload.duration_s / 2})
        results.append(asyncio.run(run_load(half, callers, [root])))
    records = [r for result in results for r in result.records]
    assert len(records) >= 50, "the smoke run sent too few requests to mean anything"
    failed = [r.error for r in records if not r.ok]
    assert not failed, failed[:5]
    for record in records:
        assert record.status == 200
        assert record.adapter == deployment.served[record.user], record
        assert record.tokens == 16 and record.ttft_s is not None
    by_replica = [
        sum(s.requests.values()) - b for s, b in zip(deployment.stubs, before, strict=True)
    ]
    assert all(n > 0 for n in by_replica), by_replica
    assert sum(by_replica) == len(records)
    summary = results[0].summary()
    assert summary["errors"] == 0 and summary["tokens_per_s"] > 0
    assert summary["ttft_ms"]["p50"] <= summary["latency_ms"]["p95"]


def test_the_load_command_writes_records_and_fails_on_errors(
    deployment: Deployment, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({u: deployment.keys[f"a:{u}"] for u in USERS[:5]}))
    out = tmp_path / "run.json"
    base = ["load", "--url", deployment.gateways[0], "--duration", "1", "--concurrency", "2"]
    assert main([*base, "--keys", str(keys), "--json", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["errors"] == 0 and summary["ok"] > 0
    written = json.loads(out.read_text())
    assert len(written["records"]) == summary["requests"]
    assert {r["user"] for r in written["records"]} <= set(USERS[:5])

    lines = tmp_path / "keys.txt"
    lines.write_text("# user key\nuser00 not-a-key\n")
    assert main([*base, "--keys", str(lines), "--no-stream"]) == 1
    assert "401" in capsys.readouterr().out


def test_one_stream_per_caller(deployment: Deployment) -> None:
    callers = [Caller(u, deployment.keys[f"b:{u}"]) for u in USERS[:6]]
    workload = Workload(duration_s=1, stream_per_caller=True, max_tokens=4)
    result = asyncio.run(run_load(workload, callers, [deployment.gateways[1]]))
    assert {r.user for r in result.records} == set(USERS[:6])
    assert all(r.ok and r.adapter == deployment.served[r.user] for r in result.records)


def test_bad_keys_files_are_usage_errors(tmp_path: Path) -> None:
    bad = tmp_path / "keys.txt"
    bad.write_text("only-one-field\n")
    assert main(["load", "--url", "http://127.0.0.1:9", "--keys", str(bad)]) == 2
    assert main(["load", "--url", "http://127.0.0.1:9", "--keys", str(tmp_path / "none")]) == 2


def test_the_stub_engine_answers_like_vllm() -> None:
    from starlette.testclient import TestClient

    state = StubState()
    with TestClient(stub_engine_app(model="base", tokens=3, state=state)) as stub:
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert stub.post("/v1/chat/completions", json={**chat, "model": "u-a-1"}).status_code == 404
        assert stub.post("/v1/load_lora_adapter", json={"lora_name": "u-a-1", "lora_path": "/x"})
        answer = stub.post("/v1/chat/completions", json={**chat, "model": "u-a-1"}).json()
        assert answer["model"] == "u-a-1" and answer["usage"]["completion_tokens"] == 2
        body = {**chat, "model": "base", "stream": True, "stream_options": {"include_usage": True}}
        events = stub.post("/v1/chat/completions", json=body).text.split("\n\n")
        assert events[-2] == "data: [DONE]" and '"completion_tokens":2' in events[-3]
        models = [m["id"] for m in stub.get("/v1/models").json()["data"]]
        assert models == ["base", "u-a-1"]
        assert stub.post("/v1/unload_lora_adapter", json={"lora_name": "u-a-1"}).status_code == 200
        assert stub.post("/v1/unload_lora_adapter", json={"lora_name": "u-a-1"}).status_code == 404
    assert state.loads == 1 and state.unloads == 1 and state.requests["u-a-1"] == 1


def test_zipf_popularity_follows_rank() -> None:
    rng = random.Random(0)
    cumulative = popularity_weights(100, "zipf", 1.1)
    counts = Counter(pick(rng, cumulative) for _ in range(20_000))
    assert counts[0] > counts[1] > counts[9] > counts[99]
    expected_top = 1.0 / cumulative[-1]
    assert abs(counts[0] / 20_000 - expected_top) < 0.02
    uniform = Counter(pick(rng, popularity_weights(4, "uniform")) for _ in range(8_000))
    assert set(uniform) == {0, 1, 2, 3} and max(uniform.values()) < 2_300


def test_poisson_arrivals_have_the_rate() -> None:
    times = poisson_arrivals(random.Random(3), rate_rps=50.0, duration_s=200.0)
    assert times == sorted(times) and times[-1] < 200.0
    assert abs(len(times) / 200.0 - 50.0) < 2.5


def test_open_loop_against_nothing_records_connection_errors() -> None:
    workload = Workload(duration_s=0.3, rate_rps=20, request_timeout_s=2)
    result = asyncio.run(run_load(workload, [Caller("u", None)], ["http://127.0.0.1:9"]))
    assert result.records and all(not r.ok and r.status == 0 for r in result.records)
    assert result.summary()["errors"] == len(result.records)


@pytest.mark.parametrize(
    "bad",
    [{"duration_s": 0}, {"concurrency": 0}, {"rate_rps": -1}, {"popularity": "pareto"}],
)
def test_workload_refuses_bad_values(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Workload(**{"duration_s": 1.0, **bad})  # type: ignore[arg-type]
