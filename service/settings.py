"""Gateway settings: one pydantic-settings object per process, env prefix `FEDPERSONA_`.

Built by `Settings()` in a command's `run()` or by a test, then passed down; nothing here runs
at import time. Engine (vLLM) settings are nested as `engine` (`FEDPERSONA_ENGINE__URL`, ...)
and owned by `fedpersona.service.engine.config`. Paths below the home come from
`fedpersona.adapters.home.Home` (which also names `FEDPERSONA_HOME`); a setting overrides one
path, never re-derives it. The store's rank limit is checked against the engine's
`--max-lora-rank` when the settings are built (`fedpersona.adapters.limits`).
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Literal

from fedpersona.adapters.home import DEFAULT_HOME, HOME_ENV, Home
from fedpersona.adapters.limits import MAX_LORA_RANK, check_engine_rank
from fedpersona.service.db import is_postgres_url
from fedpersona.service.engine.config import EngineSettings
from fedpersona.service.engine.replicas import parse_host_port
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

logger = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# Values that must never guard an admin API outside development.
_KNOWN_DEFAULT_KEYS = frozenset({"", "changethis", "change-me", "changeme", "admin", "secret"})
MIN_ADMIN_KEY_LENGTH = 24


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="FEDPERSONA_",
        env_nested_delimiter="__",
        extra="ignore",
        populate_by_name=True,  # `home` is read from HOME_ENV, and passed as `home=` in code
    )

    environment: Literal["development", "production"] = Field(
        default="development",
        description="'production' refuses a missing, default or short admin key.",
    )
    home: Path = Field(
        default=DEFAULT_HOME, validation_alias=HOME_ENV, description="root of all fedpersona state"
    )
    store_dir: Path | None = Field(default=None, description="adapter store; default <home>/store")
    registry_path: Path | None = Field(
        default=None, description="users and key hashes; default <home>/registry.sqlite"
    )
    runs_dir: Path | None = Field(default=None, description="round records; default <home>/runs")
    rounds_url: str | None = Field(
        default=None,
        description="a trainer pod's /admin/rounds URL: rounds run there, not in this process",
    )

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)

    admin_key: SecretStr = Field(
        default=SecretStr(""),
        description="Bearer key for /admin; empty disables the admin API (development only).",
    )

    personal_alias: str = Field(
        default="personal", min_length=1, description="model name meaning 'my own adapter'"
    )
    adapter_max_rank: int = Field(
        default=MAX_LORA_RANK,
        ge=1,
        description="largest LoRA rank the store accepts; at most the engine's max_lora_rank",
    )

    rate_limit_rpm: float = Field(
        default=120.0, ge=0, description="sustained requests per minute per user; 0 disables"
    )
    rate_limit_burst: int = Field(default=20, ge=1, description="bucket size per user")
    rate_limit_scope: Literal["auto", "process", "database"] = Field(
        default="auto",
        description="where the per-user buckets live: 'database' (one limit shared by every "
        "gateway on the database), 'process' (each gateway process enforces the full limit); "
        "'auto': database on PostgreSQL, process on SQLite",
    )

    database_url: SecretStr | None = Field(
        default=None,
        description="postgresql://user:password@host:5432/db: users, keys and rate limits in a "
        "PostgreSQL server shared by all gateways; unset: the SQLite file registry_path",
    )
    database_pool_size: int = Field(
        default=10, ge=1, description="PostgreSQL connections per gateway process at most"
    )

    max_request_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, description="largest request body accepted (413 above)"
    )
    max_bytes_per_token: int = Field(
        default=64,
        ge=1,
        description="upper bound on bytes one token covers; prompts longer than "
        "max_model_len * this are refused without asking the engine",
    )

    max_messages: int = Field(
        default=512, ge=1, description="most messages one chat request may carry (400 above)"
    )
    min_tokens_per_message: int = Field(
        default=1,
        ge=0,
        description="tokens the chat template adds to each message at least; counted against "
        "the context before asking the engine",
    )

    header_timeout_s: float = Field(
        default=10.0, gt=0, description="a connection must send a request's headers within this"
    )
    body_timeout_s: float = Field(
        default=30.0, gt=0, description="a request body must arrive in full within this (408)"
    )
    max_connections: int = Field(
        default=1024,
        ge=1,
        description="connections and requests served at once (uvicorn limit_concurrency); "
        "503 above",
    )
    max_in_flight_per_user: int = Field(
        default=8, ge=0, description="chat requests one user may have running at once; 0: no cap"
    )

    access_log: bool = Field(
        default=True,
        description="log one line per request when its response ends (status, duration; no "
        "query string)",
    )
    docs: bool = Field(
        default=True, description="serve /docs and /openapi.json (the chart turns them off)"
    )
    metrics_key: SecretStr = Field(
        default=SecretStr(""),
        description="Bearer key for /metrics; empty: /metrics is open (keep it off the ingress)",
    )

    proxy_tuning: bool = Field(default=False, description="send proxy experts to vLLM")
    proxy_alpha_default: float = Field(default=1.0, description="alpha for new users")

    shutdown_grace_s: float = Field(default=20.0, ge=0, description="drain time on SIGTERM")

    engine: EngineSettings = Field(default_factory=EngineSettings)

    replicas: list[str] = Field(
        default_factory=list,
        description="base URLs of several vLLM replicas (JSON list); set: users are routed by "
        "adapter affinity with failover, and no engine is supervised",
    )
    replicas_dns: str | None = Field(
        default=None,
        description="host:port of a headless Service whose A records are the vLLM replicas "
        "(re-resolved every replicas_refresh_s)",
    )
    replicas_refresh_s: float = Field(
        default=5.0, gt=0, description="how often replicas are probed and DNS re-resolved"
    )
    replicas_load_factor: float = Field(
        default=1.25,
        ge=1.0,
        description="a replica takes a user's request while its load is below this times the "
        "average (bounded-load rendezvous hashing)",
    )
    adapter_unload_grace_s: float = Field(
        default=10.0,
        ge=0,
        description="a superseded adapter version stays registered this long after its last "
        "request (other gateways sharing the engine may still send it)",
    )
    adapter_preload: int | None = Field(
        default=None,
        ge=0,
        description="most adapters loaded into vLLM ahead of requests: a served user's newly "
        "published version replaces their old one at once, and at start-up (then as they "
        "appear) the most recently published users fill up to this many; None: "
        "engine.max_cpu_loras (vLLM's adapter cache); 0: off (each first request loads)",
    )
    adapter_publish_watch_s: float = Field(
        default=0.02,
        ge=0,
        le=5.0,
        description="how often preloading looks at the store's publish stamp (one stat for the "
        "whole store) to load a new version as soon as it is published; 0: off (the per-slot "
        "poll alone, every 0.2 s)",
    )

    @model_validator(mode="after")
    def _refuse_weak_admin_key(self) -> Settings:
        key = self.admin_key.get_secret_value()
        weak = key.strip().lower() in _KNOWN_DEFAULT_KEYS or len(key) < MIN_ADMIN_KEY_LENGTH
        if not weak:
            return self
        if self.environment != "development":
            raise ValueError(
                "admin_key: refusing an empty, default or short (< "
                f"{MIN_ADMIN_KEY_LENGTH} chars) admin key outside development; set "
                "FEDPERSONA_ADMIN_KEY to a random secret (e.g. `python -c 'import secrets; "
                "print(secrets.token_urlsafe(32))'`)"
            )
        if key and not is_loopback(self.host):
            # An empty key disables /admin; a weak one is tolerated only where nobody else
            # can reach it.
            raise ValueError(
                f"admin_key: refusing a default or short (< {MIN_ADMIN_KEY_LENGTH} chars) admin "
                f"key on host {self.host!r}, which other machines can reach; use a random "
                "secret or listen on 127.0.0.1"
            )
        return self

    @model_validator(mode="after")
    def _replicas_are_external(self) -> Settings:
        if self.replicas_dns is not None:
            parse_host_port(self.replicas_dns)
        if self.replica_routing and self.engine.supervised:
            # Replicas run on their own: nothing to supervise, and the key is required below.
            first = self.replicas[0] if self.replicas else f"http://{self.replicas_dns}"
            self.engine = self.engine.model_copy(update={"url": first})
        return self

    @model_validator(mode="after")
    def _external_engine_has_a_key(self) -> Settings:
        if self.environment == "production" and not self.engine.supervised and not self.engine_key:
            raise ValueError(
                "engine.api_key: a separately run engine needs its shared secret in production; "
                "set FEDPERSONA_ENGINE__API_KEY (the engine's VLLM_API_KEY)"
            )
        return self

    @model_validator(mode="after")
    def _database_url_is_postgres(self) -> Settings:
        url = self.database_url.get_secret_value() if self.database_url is not None else ""
        if url and not is_postgres_url(url):
            raise ValueError(
                "database_url: expected a postgresql:// URL (SQLite is configured with "
                "registry_path instead)"
            )
        return self

    @model_validator(mode="after")
    def _ranks_agree(self) -> Settings:
        check_engine_rank(
            store_max_rank=self.adapter_max_rank, engine_max_lora_rank=self.engine.max_lora_rank
        )
        return self

    @property
    def engine_key(self) -> str | None:
        """The key sent to a separately run engine (None: none configured)."""
        key = self.engine.api_key
        return key.get_secret_value() or None if key is not None else None

    @property
    def replica_routing(self) -> bool:
        """True when several vLLM replicas are configured (a list or a DNS name)."""
        return bool(self.replicas) or self.replicas_dns is not None

    @property
    def admin_enabled(self) -> bool:
        return bool(self.admin_key.get_secret_value())

    @property
    def layout(self) -> Home:
        """The paths below `home`."""
        return Home(self.home)

    @property
    def store_path(self) -> Path:
        return self.store_dir or self.layout.store

    @property
    def registry_file(self) -> Path:
        return self.registry_path or self.layout.registry

    @property
    def registry_location(self) -> Path | str:
        """What `Registry` opens: the PostgreSQL URL when set, else the SQLite file."""
        if self.database_url is not None and self.database_url.get_secret_value():
            return self.database_url.get_secret_value()
        return self.registry_file

    @property
    def runs_path(self) -> Path:
        return self.runs_dir or self.layout.runs

    @property
    def large_model_dir(self) -> Path:
        """The served base model's directory: `engine.model_dir`, else `<home>/models/large`."""
        return self.engine.model_dir or self.layout.large_model

    @property
    def engine_log(self) -> Path:
        """Where the supervised engine's output goes."""
        return self.layout.logs / "vllm.log"
