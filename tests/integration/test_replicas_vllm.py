"""Two gateways over two real vLLM replicas (real processes on loopback), the scale-out layout.

Both gateways are built from settings alone (`replicas=[...]`, the chart's layout with URLs
instead of DNS) and share one store. Checked: every user is answered by their own adapter on
their affinity replica, whichever gateway they use, with exactly vLLM's answer for it; no
gateway unloads an adapter the other uses (both serve every user, and nothing is unloaded);
killing one replica loses no request: its users are answered by the other replica, identically.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fedpersona.adapters import AdapterStore, Slot
from fedpersona.adapters.refs import engine_adapter_name
from fedpersona.service.engine.config import EngineSettings, build_launch
from fedpersona.service.engine.replicas import owner
from fedpersona.service.engine.supervisor import EngineSupervisor
from fedpersona.service.http.app import create_app
from fedpersona.service.registry import Registry
from fedpersona.service.settings import Settings
from support.lora import strong_lora
from support.servers import free_port, serve_in_thread

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy")


def users_on_both(urls: list[str], per_replica: int = 3) -> list[str]:
    """`per_replica` users whose affinity replica is each of `urls` (the ports are random, so a
    fixed list of names could all hash to one replica)."""
    by_home: dict[str, list[str]] = {u: [] for u in urls}
    for name in NAMES + tuple(f"user{i}" for i in range(64)):
        home = by_home[owner(name, urls)]
        if len(home) < per_replica:
            home.append(name)
    return [name for home in by_home.values() for name in home]


KEY = "replica-test-engine-key-0123456789"
BODY: dict[str, Any] = {
    "messages": [{"role": "user", "content": "Tell me about the sea."}],
    "temperature": 0.0,
    "max_tokens": 12,
    "seed": 0,
}


@pytest.fixture(scope="module")
def replicas(micro_models: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    home = tmp_path_factory.mktemp("replicas")
    loop = asyncio.new_event_loop()
    supervisors = []
    for i in range(2):
        settings = EngineSettings(
            model_dir=micro_models.large.path,
            served_model_name=micro_models.large.name,
            port=free_port(),
            max_loras=2,
            max_cpu_loras=4,
            max_lora_rank=16,
            max_model_len=256,
            kv_cache_gib=1,
            api_key=KEY,
        )
        launch = build_launch(settings, home=home / f"r{i}")
        supervisors.append(EngineSupervisor(launch, log_path=home / f"r{i}.log", max_restarts=0))
    started = time.monotonic()
    try:
        for s in supervisors:
            loop.run_until_complete(s.start())
        for s in supervisors:
            loop.run_until_complete(s.wait_ready(timeout=900))
        print(f"\ntwo vLLM replicas ready in {time.monotonic() - started:.1f} s")
        yield loop, supervisors, micro_models
    finally:
        for s in supervisors:
            loop.run_until_complete(s.stop(5.0))
        loop.close()


def ask(root: str, key: str) -> httpx.Response:
    return httpx.post(
        f"{root}/v1/chat/completions",
        json={"model": "personal", **BODY},
        headers={"Authorization": f"Bearer {key}"},
        timeout=120,
    )


def direct(url: str, model: str) -> str:
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": model, **BODY},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=120,
    )
    r.raise_for_status()
    return str(r.json()["choices"][0]["message"]["content"])


def registered(url: str) -> list[str]:
    r = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    return [card["id"] for card in r.json()["data"]]


def test_two_gateways_two_replicas(replicas: Any, tmp_path: Path) -> None:
    loop, supervisors, models = replicas
    urls = [s.launch.base_url for s in supervisors]
    users = users_on_both(urls)
    store_dir = tmp_path / "store"
    store = AdapterStore(store_dir, max_rank=16)
    names = {}
    for seed, user in enumerate(users):
        adapter = strong_lora(models.large.path, models.large.name, seed + 1)
        version = store.publish_lora(Slot.user_served(user), adapter)
        names[user] = engine_adapter_name(user, version.id)
    gateways = []
    for g in ("a", "b"):
        settings = Settings.model_validate(
            {
                "home": tmp_path / g,
                "store_dir": store_dir,
                "rate_limit_rpm": 0,
                "replicas": urls,
                "replicas_refresh_s": 0.5,
                "engine": {
                    "served_model_name": models.large.name,
                    "max_model_len": 256,
                    "max_loras": 2,
                    "max_cpu_loras": 4,
                    "api_key": KEY,
                },
            }
        )
        registry = Registry(settings.registry_file)
        keys = {}
        for user in users:
            registry.create_user(user)
            keys[user] = registry.issue_key(user).api_key
        gateways.append((create_app(settings, registry=registry), keys))

    with serve_in_thread(gateways[0][0]) as root_a, serve_in_thread(gateways[1][0]) as root_b:
        roots = [(root_a, gateways[0][1]), (root_b, gateways[1][1])]
        answers: dict[str, str] = {}
        for _ in range(2):
            for root, keys in roots:
                for user in users:
                    response = ask(root, keys[user])
                    assert response.status_code == 200, response.text
                    text = response.json()["choices"][0]["message"]["content"]
                    assert answers.setdefault(user, text) == text
        # Each adapter lives on its user's affinity replica only, with vLLM's own answer.
        for user in users:
            home = owner(user, urls)
            assert names[user] in registered(str(home))
            assert answers[user] == direct(str(home), names[user])
            other = next(u for u in urls if u != home)
            assert names[user] not in registered(other)
        assert len(set(answers.values())) > 1
        assert all(u in {owner(x, urls) for x in users} for u in urls), "both replicas used"

        # Kill one replica: its users move to the other; no request fails.
        loop.run_until_complete(supervisors[0].stop(1.0))
        for root, keys in roots:
            for user in users:
                response = ask(root, keys[user])
                assert response.status_code == 200, (user, response.text)
                assert response.json()["choices"][0]["message"]["content"] == answers[user]
        for user in users:
            assert names[user] in registered(urls[1])
