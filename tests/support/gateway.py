"""A real gateway in front of a running vLLM server, for the integration tests.

`running_gateway` builds the full app (`fedpersona.service.http.app.create_app`) with its own
home (store, SQLite registry with the given users and their keys) and a real `AdapterManager`
loading into the engine at `engine_url`, and serves it under uvicorn in a thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpersona.adapters import AdapterStore
from fedpersona.service.engine.adapters import AdapterManager
from fedpersona.service.engine.client import EngineClient
from fedpersona.service.http.app import create_app
from fedpersona.service.registry import Registry
from fedpersona.service.settings import Settings

from support.servers import serve_in_thread


@dataclass
class RunningGateway:
    root: str  # http://127.0.0.1:PORT
    url: str  # the OpenAI base URL, root + /v1
    settings: Settings
    store: AdapterStore
    registry: Registry
    manager: AdapterManager
    engine: EngineClient
    keys: dict[str, str]  # user -> API key


@contextmanager
def running_gateway(
    *,
    home: Path,
    engine_url: str,
    model: str,
    max_model_len: int,
    admin_key: str,
    users: Iterable[str],
    gate: Callable[[], Any] | None = None,
    engine_api_key: str | None = None,
    **settings: Any,
) -> Iterator[RunningGateway]:
    """`settings` are more gateway settings (e.g. `store_dir`, `proxy_tuning=True`); `gate` is
    the engine supervisor's `check_available`; `engine_api_key` the engine's shared secret."""
    config = Settings.model_validate(
        {
            "home": home,
            "admin_key": admin_key,
            "rate_limit_rpm": 0,
            "engine": {
                "url": engine_url,
                "served_model_name": model,
                "max_model_len": max_model_len,
                "max_loras": 2,
                "max_cpu_loras": 4,
                "api_key": engine_api_key,
            },
            **settings,
        }
    )
    store = AdapterStore(config.store_path, max_rank=config.adapter_max_rank)
    registry = Registry(config.registry_file)
    keys = {}
    for user in users:
        registry.create_user(user)
        keys[user] = registry.issue_key(user).api_key
    engine = EngineClient(config.engine.base_url, api_key=config.engine_key, gate=gate)
    manager = AdapterManager(store=store, engine=engine, max_loaded=4)
    app = create_app(
        config, engine=engine, adapters=manager, store=store, registry=registry, base_model=model
    )
    with serve_in_thread(app, name="gateway") as root:
        yield RunningGateway(
            root=root,
            url=f"{root}/v1",
            settings=config,
            store=store,
            registry=registry,
            manager=manager,
            engine=engine,
            keys=keys,
        )
