"""Fixtures of the gateway tests: a real on-disk store and registry, a fake engine, the app.

Each test gets its own home directory, `AdapterStore` (real, with tiny published LoRAs), SQLite
registry with users alice, bob and carol (carol without an adapter), the real `AdapterManager`
driving a `FakeEngine`, and a Starlette `TestClient` around `create_app`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_engine import FakeEngine
from fastapi.testclient import TestClient
from fedpersona.adapters import AdapterStore, Slot
from fedpersona.service.http.app import create_app
from fedpersona.service.registry import Registry
from gateway_harness import Gateway, GatewayFactory, make_settings, tiny_lora
from support.postgres import postgres_server, postgres_url  # noqa: F401 (fixtures)


@pytest.fixture
def make_gateway(tmp_path: Path) -> Iterator[GatewayFactory]:
    """Build a gateway; keyword arguments override settings, `rounds=` injects a controller."""
    clients: list[TestClient] = []

    def build(
        *,
        rounds: Any = None,
        supervisor: Any = None,
        users: tuple[str, ...] = ("alice", "bob", "carol"),
        with_adapters: tuple[str, ...] = ("alice", "bob"),
        **overrides: Any,
    ) -> Gateway:
        settings = make_settings(tmp_path / f"gateway-{len(clients)}", **overrides)
        store = AdapterStore(settings.store_path, max_rank=16)
        registry = Registry(settings.registry_file)
        engine = FakeEngine()
        keys, served = {}, {}
        for i, user in enumerate(users):
            registry.create_user(user)
            keys[user] = registry.issue_key(user).api_key
            if user in with_adapters:
                served[user] = store.publish_lora(Slot.user_served(user), tiny_lora(seed=i))
        app = create_app(
            settings,
            engine=engine,
            store=store,
            registry=registry,
            rounds_controller=rounds,
            supervisor=supervisor,
        )
        client = TestClient(app)
        client.__enter__()
        clients.append(client)
        return Gateway(client, engine, store, registry, settings, keys, served)

    yield build
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def gw(make_gateway: GatewayFactory) -> Gateway:
    return make_gateway()
