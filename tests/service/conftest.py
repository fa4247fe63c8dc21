"""Fixtures of the gateway tests: a real on-disk store and registry, a fake engine, the app.

Each test gets its own home directory, `AdapterStore` (real, with tiny published LoRAs), SQLite
registry with users alice and bob, the real `AdapterManager` driving a `FakeEngine`, and a
Starlette `TestClient` around `create_app`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from fake_engine import BASE_MODEL, FakeEngine
from fastapi.testclient import TestClient

from adapters import AdapterStore, LoraAdapter, Slot, Version
from service.app import create_app
from service.registry import Registry
from service.settings import Settings

ADMIN_KEY = "test-admin-key-0123456789abcdef"
HIDDEN = 128


def tiny_lora(seed: int, *, r: int = 2, base_model: str = BASE_MODEL) -> LoraAdapter:
    """A valid rank-`r` LoRA on one q_proj of a hidden-128 Llama (real PEFT key names)."""
    gen = torch.Generator().manual_seed(seed)
    module = "base_model.model.model.layers.0.self_attn.q_proj"
    return LoraAdapter(
        r=r,
        alpha=float(2 * r),
        target_modules=("q_proj",),
        base_model=base_model,
        tensors={
            f"{module}.lora_A.weight": torch.randn(r, HIDDEN, generator=gen) * 0.01,
            f"{module}.lora_B.weight": torch.randn(HIDDEN, r, generator=gen) * 0.01,
        },
    )


def make_settings(home: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "home": home,
        "admin_key": ADMIN_KEY,
        "rate_limit_rpm": 0,
        "engine": {"served_model_name": BASE_MODEL, "max_model_len": 256, "max_cpu_loras": 4},
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@dataclass
class Gateway:
    client: TestClient
    engine: FakeEngine
    store: AdapterStore
    registry: Registry
    settings: Settings
    keys: dict[str, str]  # user -> raw API key
    served: dict[str, Version]  # user -> published served version

    def auth(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[user]}"}

    def chat(self, who: str, /, model: str = "personal", **body: Any) -> Any:
        payload = {"model": model, "messages": [{"role": "user", "content": "hi"}], **body}
        return self.client.post("/v1/chat/completions", json=payload, headers=self.auth(who))

    def metrics(self) -> str:
        text: str = self.client.get("/metrics").text
        return text


GatewayFactory = Callable[..., Gateway]


@pytest.fixture
def make_gateway(tmp_path: Path) -> Iterator[GatewayFactory]:
    """Build a gateway; keyword arguments override settings, `rounds=` injects a controller."""
    clients: list[TestClient] = []

    def build(
        *,
        rounds: Any = None,
        users: tuple[str, ...] = ("alice", "bob", "carol"),
        with_adapters: tuple[str, ...] = ("alice", "bob"),
        **overrides: Any,
    ) -> Gateway:
        settings = make_settings(tmp_path, **overrides)
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
            settings, engine=engine, store=store, registry=registry, rounds_controller=rounds
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


def engine_name(version: Version) -> str:
    user = version.slot.user
    return f"u-{user}-{version.id}"
