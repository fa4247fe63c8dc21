"""The services one gateway app holds (settings, registry, store, engine, ...), in one object.

Built by `service.app.create_app` and kept on `app.state.services`; routes and dependencies get
it through `get_services`. Tests build apps with fakes injected instead of the real engine or
round controller. Nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import Request

from adapters import AdapterStore
from service.chat import ChatService
from service.metrics import Metrics
from service.ratelimit import RateLimiter
from service.registry import Registry
from service.settings import Settings


class Engine(Protocol):
    """What the app needs of `service.engine.EngineClient` beyond chat (see contracts.md)."""

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]: ...

    def stream_chat(self, body: dict[str, Any]) -> Any: ...

    async def health(self) -> bool: ...

    async def aclose(self) -> None: ...


@dataclass
class Services:
    settings: Settings
    registry: Registry
    store: AdapterStore
    engine: Engine
    adapters: Any  # service.adapter_manager.AdapterManager (or a test double with .use())
    metrics: Metrics
    limiter: RateLimiter | None
    chat: ChatService
    base_model: str
    created: int  # unix time, reported as the models' `created`
    rounds: Any | None = None  # trainer.api.RoundController (or a fake); None: no round API
    supervisor: Any | None = None  # service.supervisor.EngineSupervisor in embedded mode


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services
