"""Preloading against the real vLLM server of the session: a published version is registered in
vLLM (its `/v1/models` lists it) before any request asks for it, and the request then pays no
load; a served user's next version is registered the same way.

The user is unique to this test and its adapters are unloaded at the end. The manager's
unload grace is long, so the start-up reconciliation never unloads what other tests left in the
shared server while this test runs (closing the manager drops those pending unloads).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest
from conftest import VllmServer
from fedpersona.adapters import AdapterStore, Slot
from fedpersona.adapters.refs import engine_adapter_name
from fedpersona.service.engine.adapters import AdapterManager
from fedpersona.service.engine.client import EngineClient
from fedpersona.service.metrics import Metrics
from support.lora import strong_lora

pytestmark = pytest.mark.vllm

WAIT_S = 60.0  # a poll every 0.2 s and one load; generous for a loaded machine


async def listed(engine: EngineClient, name: str) -> float:
    """Seconds until vLLM lists `name` (fails after WAIT_S)."""
    started = time.monotonic()
    while name not in await engine.models():
        assert time.monotonic() - started < WAIT_S, f"{name} was not preloaded"
        await asyncio.sleep(0.1)
    return time.monotonic() - started


def test_a_published_version_is_in_vllm_before_its_first_request(
    vllm_server: VllmServer, tmp_path: Path
) -> None:
    store = AdapterStore(tmp_path / "store", max_rank=16)
    user = f"preload-{uuid.uuid4().hex[:8]}"
    metrics = Metrics()

    def publish(seed: int) -> str:
        adapter = strong_lora(vllm_server.model_dir, vllm_server.model, seed)
        version = store.publish_lora(Slot.user_served(user), adapter)
        return engine_adapter_name(user, version.id)

    def loads() -> float | None:
        return metrics.registry.get_sample_value("fedpersona_adapter_loads_total")

    async def main() -> list[str]:
        engine = EngineClient(vllm_server.base_url, api_key=vllm_server.api_key)
        manager = AdapterManager(
            store=store, engine=engine, metrics=metrics, unload_grace_s=3600, preload=64
        )
        names: list[str] = []
        try:
            await manager.start()  # as a gateway starts: reconcile, then preload in background
            names.append(publish(1))  # a trainer publishes this user's first version
            await listed(engine, names[0])
            assert loads() == 1
            async with manager.use(user) as name:
                assert name == names[0]
                reply = await engine.chat(
                    {
                        "model": name,
                        "messages": [{"role": "user", "content": "Hello"}],
                        "max_tokens": 4,
                    }
                )
            assert reply["choices"][0]["message"]["content"] is not None
            assert loads() == 1  # the request found it loaded
            names.append(publish(2))  # the served user's next version
            await listed(engine, names[1])
            assert loads() == 2
            async with manager.use(user) as name:
                assert name == names[1]
            assert loads() == 2
        finally:
            await manager.aclose()
            for name in names:
                await engine.unload_lora(name)
            await engine.aclose()
        return names

    names = asyncio.run(main())
    assert not set(names) & set(vllm_server.registered())
