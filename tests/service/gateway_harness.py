"""Builders shared by the gateway tests (imported by module name, not as a conftest).

A uniquely named module rather than helpers in `conftest.py`: several test directories have a
conftest, so `from conftest import ...` would be ambiguous in a whole-suite run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fake_engine import BASE_MODEL, FakeEngine
from fastapi.testclient import TestClient
from fedpersona.adapters import AdapterStore, LoraAdapter, Version
from fedpersona.service.registry import Registry
from fedpersona.service.settings import Settings
from support.lora import random_lora

ADMIN_KEY = "test-admin-key-0123456789abcdef"


def tiny_lora(seed: int, *, r: int = 2, base_model: str = BASE_MODEL) -> LoraAdapter:
    """A valid rank-`r` LoRA on layer 0's q_proj of the tiny Llama (real PEFT key names)."""
    return random_lora(
        seed=seed, r=r, targets=("q_proj",), layers=(0,), base_model=base_model, scale=0.01
    )


def make_settings(home: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "home": home,
        "admin_key": ADMIN_KEY,
        "rate_limit_rpm": 0,
        "engine": {"served_model_name": BASE_MODEL, "max_model_len": 256, "max_cpu_loras": 4},
        # These tests check loading on demand; preloading has its own (test_adapter_preload).
        "adapter_preload": 0,
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


def engine_name(version: Version) -> str:
    user = version.slot.user
    return f"u-{user}-{version.id}"
