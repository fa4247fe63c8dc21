"""The ONE real vLLM server of a test session, and a real gateway in front of it.

`vllm_server` (session scope) starts vLLM on the `micro_models` large model through
`EngineSupervisor`, the same code path `fedpersona serve` uses, with `max_loras=2` and
`max_cpu_loras=4` so that adapter eviction happens with a handful of users, with the FedPT
logits processor on (requests without proxy arguments are untouched by it), and with an engine
key like every launch (`VllmServer.headers` for tests that talk to vLLM directly). Every test that
needs a real engine shares it (marker `vllm`); adapters are content-named, so tests cannot see
each other's.

`gateway` (module scope) runs the full app (`fedpersona.service.http.app.create_app`, built by
`support.gateway.running_gateway`) under uvicorn on a free port in a thread, with its own home
(store, registry) and an `AdapterManager` loading into the shared server. Tests talk to it with
the official `openai` SDK.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from fedpersona.adapters import Slot, Version
from fedpersona.service.engine.config import EngineSettings, build_launch
from fedpersona.service.engine.supervisor import EngineSupervisor
from fedpersona.service.errors import EngineStartFailed
from support.gateway import RunningGateway, running_gateway
from support.lora import strong_lora
from support.servers import free_port

T = TypeVar("T")
ADMIN_KEY = "integration-admin-key-0123456789"
MAX_MODEL_LEN = 256


class LoopThread:
    """An asyncio loop in a daemon thread, for async objects that outlive one test."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@dataclass
class VllmServer:
    base_url: str
    model: str  # served name of the base model
    model_dir: Path
    supervisor: EngineSupervisor
    loop: LoopThread
    ready_s: float
    api_key: str  # the engine's shared secret (generated per session, as in embedded mode)

    @property
    def headers(self) -> dict[str, str]:
        """What the gateway sends: the engine refuses everything but probes without it."""
        return {"Authorization": f"Bearer {self.api_key}"}

    def direct(self, body: dict[str, Any]) -> dict[str, Any]:
        """A chat completion straight from vLLM (no gateway)."""
        import httpx

        response = httpx.post(
            f"{self.base_url}/v1/chat/completions", json=body, headers=self.headers, timeout=120
        )
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def registered(self) -> list[str]:
        import httpx

        response = httpx.get(f"{self.base_url}/v1/models", headers=self.headers, timeout=30)
        response.raise_for_status()
        return [card["id"] for card in response.json()["data"]]


@pytest.fixture(scope="session")
def vllm_server(
    micro_models: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VllmServer]:
    home = tmp_path_factory.mktemp("vllm-home")
    settings = EngineSettings(
        model_dir=micro_models.large.path,
        served_model_name=micro_models.large.name,
        port=free_port(),
        max_loras=2,
        max_cpu_loras=4,
        max_lora_rank=16,
        max_model_len=MAX_MODEL_LEN,
        kv_cache_gib=1,
        # FedPT: the proxy-tuning logits processor runs in the shared server too (requests
        # without an expert are untouched); tests/integration/test_proxy_tuning.py uses it.
        proxy_small_model=micro_models.small.path,
    )
    launch = build_launch(settings, home=home)
    # The processor's debug counters (live request states, KV bytes, failures) land here.
    launch.env["FEDPERSONA_PROXY_STATS_FILE"] = str(home / "proxy-stats.json")
    supervisor = EngineSupervisor(launch, log_path=home / "logs" / "vllm.log", max_restarts=2)
    loop = LoopThread("vllm-supervisor")
    started = time.monotonic()
    loop.run(supervisor.start())
    try:
        loop.run(supervisor.wait_ready(timeout=900))
    except (EngineStartFailed, TimeoutError) as e:
        loop.run(supervisor.stop())
        loop.close()
        pytest.fail(f"vLLM did not start: {e}")
    server = VllmServer(
        base_url=launch.base_url,
        model=launch.served_model_name,
        model_dir=micro_models.large.path,
        supervisor=supervisor,
        loop=loop,
        ready_s=time.monotonic() - started,
        api_key=launch.api_key,
    )
    print(f"\nvLLM ready in {server.ready_s:.1f} s at {server.base_url}")
    try:
        yield server
    finally:
        loop.run(supervisor.stop(5.0), timeout=60)
        loop.close()


@dataclass
class GatewayUnderTest(RunningGateway):
    vllm: VllmServer

    def publish(self, user: str, seed: int) -> Version:
        adapter = strong_lora(self.vllm.model_dir, self.vllm.model, seed)
        return self.store.publish_lora(Slot.user_served(user), adapter, metadata={"seed": seed})


USERS = ("alice", "bob", "carol", "dave", "erin", "frank")


@pytest.fixture(scope="module")
def gateway(
    vllm_server: VllmServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayUnderTest]:
    with running_gateway(
        home=tmp_path_factory.mktemp("gateway-home"),
        engine_url=vllm_server.base_url,
        model=vllm_server.model,
        max_model_len=MAX_MODEL_LEN,
        admin_key=ADMIN_KEY,
        users=USERS,
        gate=vllm_server.supervisor.check_available,
        engine_api_key=vllm_server.api_key,
    ) as running:
        vllm_server.supervisor.on_restart(running.manager.reset)
        yield GatewayUnderTest(**vars(running), vllm=vllm_server)
