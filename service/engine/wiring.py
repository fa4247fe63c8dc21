"""The engine side of a gateway built from `Settings`: one adapter manager, or a replica set.

Decides the adapter policy once: an engine this gateway supervises is its own, so the manager
also bounds the names it registers (`max_cpu_loras`); a separately run engine may be shared
with other gateway replicas, so the manager leaves capacity to vLLM's LRU and unloads only
superseded versions, after `adapter_unload_grace_s`. Each replica of a `ReplicaSet` is such a
shared engine with its own manager. Used by `fedpersona.service.http.app.create_app`; starts
nothing.
"""

from __future__ import annotations

from fedpersona.adapters import AdapterStore
from fedpersona.service.engine.adapters import AdapterManager
from fedpersona.service.engine.client import EngineClient
from fedpersona.service.engine.replica_set import ReplicaSet
from fedpersona.service.engine.replicas import parse_host_port
from fedpersona.service.metrics import Metrics
from fedpersona.service.settings import Settings


def build_adapter_manager(
    settings: Settings, *, store: AdapterStore, engine: EngineClient, metrics: Metrics
) -> AdapterManager:
    shared = not settings.engine.supervised
    return AdapterManager(
        store=store,
        engine=engine,
        max_loaded=None if shared else settings.engine.max_cpu_loras,
        unload_grace_s=settings.adapter_unload_grace_s if shared else 0.0,
        metrics=metrics,
        preload=settings.engine.max_cpu_loras
        if settings.adapter_preload is None
        else settings.adapter_preload,
        preload_notice_s=settings.adapter_publish_watch_s,
    )


def build_replica_set(settings: Settings, *, store: AdapterStore, metrics: Metrics) -> ReplicaSet:
    def make_client(url: str) -> EngineClient:
        return EngineClient(
            url, api_key=settings.engine_key, request_timeout_s=settings.engine.request_timeout_s
        )

    def make_adapters(client: EngineClient) -> AdapterManager:
        return build_adapter_manager(settings, store=store, engine=client, metrics=metrics)

    return ReplicaSet(
        make_client=make_client,
        make_adapters=make_adapters,
        urls=settings.replicas,
        dns=parse_host_port(settings.replicas_dns) if settings.replicas_dns else None,
        load_factor=settings.replicas_load_factor,
        refresh_s=settings.replicas_refresh_s,
    )
