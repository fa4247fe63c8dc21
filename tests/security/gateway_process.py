"""A real gateway under the real uvicorn configuration (`uvicorn_config`), in a thread, in
front of a slow engine stub that records cancellations. Imported by module name."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from fedpersona.adapters import AdapterStore
from fedpersona.service.http.app import create_app
from fedpersona.service.http.server import uvicorn_config
from fedpersona.service.registry import Registry
from fedpersona.service.settings import Settings
from support.servers import free_port

BASE = "security-base"
ADMIN_KEY = "security-admin-key-0123456789"


@dataclass
class SlowEngine:
    """Answers after `delay_s`; counts requests started, finished and cancelled."""

    delay_s: float = 5.0
    started: int = 0
    finished: int = 0
    cancelled: int = 0
    bodies: list[dict[str, Any]] = field(default_factory=list)

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        self.started += 1
        self.bodies.append(body)
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.finished += 1
        return {
            "id": "x",
            "object": "chat.completion",
            "created": 1,
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "ok"},
                    "finish_reason": "stop",
                }
            ],
        }

    async def stream_chat(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        raise NotImplementedError
        yield b""

    async def health(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None


class NoAdapters:
    def use(self, user_id: str) -> Any:
        @contextmanager
        def none() -> Iterator[None]:
            yield None

        from contextlib import asynccontextmanager

        @asynccontextmanager
        async def nothing() -> AsyncIterator[None]:
            yield None

        return nothing()


@dataclass
class LiveGateway:
    host: str
    port: int
    engine: SlowEngine
    keys: dict[str, str]
    settings: Settings

    @property
    def root(self) -> str:
        return f"http://{self.host}:{self.port}"


@contextmanager
def live_gateway(
    home: Path, *, engine: SlowEngine | None = None, **settings: Any
) -> Iterator[LiveGateway]:
    config = Settings.model_validate(
        {
            "home": home,
            "admin_key": ADMIN_KEY,
            "rate_limit_rpm": 0,
            "engine": {"served_model_name": BASE, "max_model_len": 256},
            **settings,
        }
    )
    engine = engine or SlowEngine()
    registry = Registry(config.registry_file)
    keys = {}
    for user in ("alice", "bob"):
        registry.create_user(user)
        keys[user] = registry.issue_key(user).api_key
    store = AdapterStore(config.store_path, max_rank=16)
    app = create_app(
        config,
        engine=engine,
        adapters=NoAdapters(),
        store=store,
        registry=registry,
        base_model=BASE,
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn_config(app, config, host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, name="security-gateway", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("gateway did not start")
        time.sleep(0.05)
    try:
        yield LiveGateway("127.0.0.1", port, engine, keys, config)
    finally:
        server.should_exit = True
        thread.join(30)
