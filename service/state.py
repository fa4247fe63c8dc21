"""The services one gateway app holds (settings, registry, store, engine, ...), in one object.

Built by `fedpersona.service.http.app.create_app` and kept on `app.state.services`; routes and
dependencies get
it through `get_services`. Tests build apps with fakes injected instead of the real engine.
(The round controller is not one of these services: it sits on `app.state.rounds`, see
`fedpersona.service.http.routes.rounds`.) Nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import Request
from fedpersona.adapters import AdapterStore
from fedpersona.service.http.chat import ChatService
from fedpersona.service.metrics import Metrics
from fedpersona.service.ratelimit import RateLimiter
from fedpersona.service.registry import Registry
from fedpersona.service.settings import Settings


class Engine(Protocol):
    """What the app needs of `fedpersona.service.engine.client.EngineClient` beyond chat (see
    contracts.md)."""

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
    adapters: (
        Any  # fedpersona.service.engine.adapters.AdapterManager (or a test double with .use())
    )
    metrics: Metrics
    limiter: RateLimiter | None
    chat: ChatService
    base_model: str
    created: int  # unix time, reported as the models' `created`
    supervisor: Any | None = (
        None  # fedpersona.service.engine.supervisor.EngineSupervisor in embedded mode
    )


async def get_services(request: Request) -> Services:
    # `async`: FastAPI runs a plain `def` dependency in its thread pool, a thread hand-off per
    # request for an attribute read.
    services: Services = request.app.state.services
    return services
