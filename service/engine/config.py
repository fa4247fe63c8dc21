"""The vLLM engine's settings and the exact command line that starts it.

`EngineSettings` is nested in the gateway's `Settings` as `engine` (env `FEDPERSONA_ENGINE__...`).
`build_launch` turns it into an `EngineLaunch` (argv + environment + where the server will
listen). The supervisor runs that launch, and `fedpersona engine` prints or execs the same one, so
the embedded mode and the vLLM container of the Helm chart share one command line.

Every fact it uses about models and the home comes from `fedpersona.adapters`: the served name
is the model manifest's (`read_model_manifest`, strict: no manifest, no launch, unless
`served_model_name` is configured), default paths come from `Home`, and `max_lora_rank` must be
a rank vLLM accepts (`VLLM_LORA_RANKS`, default `MAX_LORA_RANK`).

Model-dependent settings left unset (max model length, dtype, KV cache, memory fraction) follow
the model: its manifest's engine hints, else its config (`EngineSettings.for_model`).

This module starts nothing and knows nothing about HTTP; its only I/O is reading the model's
`fedpersona.json` and `config.json`.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fedpersona.adapters.home import Home
from fedpersona.adapters.limits import MAX_LORA_RANK, VLLM_LORA_RANKS
from fedpersona.adapters.manifest import read_model_manifest
from fedpersona.service.engine.guard import ENGINE_API_KEY_ENV, GUARD_MIDDLEWARE
from fedpersona.service.engine.placement import parse_cpu_list
from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator

DEFAULT_MAX_MODEL_LEN = 2048
DEFAULT_KV_CACHE_GIB = 1

# Environment of the vLLM process read by the proxy-tuning processor (`ProxySettings`).
PROXY_SMALL_MODEL_ENV = "FEDPERSONA_PROXY_SMALL_MODEL"
PROXY_STORE_ENV = "FEDPERSONA_STORE_DIR"

# Environment variables that would let vLLM resolve adapters by a client-supplied name (the
# filesystem and Hugging Face resolver plugins join the requested model name into a path or a
# repo id). The gateway alone decides which adapter is served, so they are always removed.
_RESOLVER_ENV = ("VLLM_LORA_RESOLVER_CACHE_DIR", "VLLM_LORA_RESOLVER_HF_REPO_LIST")

# Flags that build_launch owns; setting them through extra_args would silently fight it.
_OWNED_FLAGS = frozenset(
    {
        "--model",
        "--served-model-name",
        "--host",
        "--port",
        "--enable-lora",
        "--max-loras",
        "--max-cpu-loras",
        "--max-lora-rank",
        "--max-model-len",
        "--dtype",
        "--logits-processors",
        "--lora-modules",
        "--middleware",
        "--api-key",
    }
)
# Environment values `EngineLaunch.shell` and `fedpersona engine` never print.
_SECRET_ENV = frozenset({ENGINE_API_KEY_ENV})


DEFAULT_MAX_LORAS = 16  # vLLM LoRA slots when not set (see `EngineSettings.max_loras`)


class EngineSettings(BaseModel):
    """How to reach (or start) the vLLM server. Defaults suit the CPU build on one machine."""

    url: str | None = Field(
        default=None,
        description="base URL of a running vLLM server; None: the gateway supervises its own",
    )
    model_dir: Path | None = Field(
        default=None, description="large base model dir; None: <home>/models/large"
    )
    served_model_name: str | None = Field(
        default=None, description="None: the name in <model_dir>/fedpersona.json"
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8100, ge=1, le=65535)
    # None: 16, or max_cpu_loras if smaller. 16 is about the distinct users one batch holds
    # under load: vLLM batches at most this many different adapters; with 4, 16 streams of
    # 1,000 users ran at 0.43-0.62 of one shared adapter's throughput, with 16 at 0.66-1.22
    # (benchmarks/thousand_users.py, docs/benchmarks.md).
    max_loras: int | None = Field(
        default=None, ge=1, description="adapters in one batch (vLLM slots); None: 16"
    )
    max_cpu_loras: int = Field(default=32, ge=1, description="vLLM's LRU cache above the slots")
    max_lora_rank: int = Field(
        default=MAX_LORA_RANK, description="--max-lora-rank; the store's limit may not exceed it"
    )
    # None: follow the model (its manifest's engine hints, else its config), see `for_model`.
    max_model_len: int | None = Field(
        default=None, ge=16, description="None: the model manifest's hint, else its config"
    )
    kv_cache_gib: int | None = Field(
        default=None, ge=1, description="VLLM_CPU_KVCACHE_SPACE (CPU build); None: the model's"
    )
    dtype: str | None = Field(default=None, description="None: the model manifest's hint")
    gpu_memory_utilization: float | None = Field(
        default=None, gt=0, le=1, description="--gpu-memory-utilization; None: the model's hint"
    )
    cpu_cores: str | None = Field(
        default=None,
        description="CPU build: the cores vLLM runs on, its model compute bound there (e.g. 0 "
        "or 0-5; VLLM_CPU_OMP_THREADS_BIND); an embedded engine's gateway keeps off them. None: "
        "vLLM's own binding, every process anywhere (see fedpersona.service.engine.placement)",
    )
    extra_args: list[str] = Field(default_factory=list)
    proxy_small_model: Path | None = Field(
        default=None, description="small base model dir; set: enable the FedPT logits processor"
    )
    proxy_processor: str = Field(
        default="fedpersona.service.proxy_tuning.processor:ProxyTuningLogitsProcessor",
        description="module:Class of the FedPT vLLM logits processor",
    )
    api_key: SecretStr | None = Field(
        default=None,
        description="shared secret between the gateway and vLLM (vLLM's VLLM_API_KEY); None in "
        "embedded mode: a fresh one per start; required for a separately run engine",
    )
    ready_timeout_s: float = Field(default=600.0, gt=0)
    request_timeout_s: float = Field(default=600.0, gt=0)

    @field_validator("max_lora_rank")
    @classmethod
    def _known_rank(cls, value: int) -> int:
        if value not in VLLM_LORA_RANKS:
            raise ValueError(f"max_lora_rank must be one of {VLLM_LORA_RANKS}, got {value}")
        return value

    @field_validator("cpu_cores")
    @classmethod
    def _cpu_list(cls, value: str | None) -> str | None:
        if value is not None:
            parse_cpu_list(value)  # ValueError: not a CPU list
        return value

    @field_validator("extra_args")
    @classmethod
    def _no_owned_flags(cls, value: list[str]) -> list[str]:
        clashes = sorted({a.split("=", 1)[0] for a in value} & _OWNED_FLAGS)
        if clashes:
            raise ValueError(
                f"extra_args may not set {', '.join(clashes)}: use the engine settings"
            )
        return value

    @field_validator("proxy_processor")
    @classmethod
    def _qualified(cls, value: str) -> str:
        module, sep, name = value.partition(":")
        if not (module and sep and name):
            raise ValueError(f"proxy_processor must look like 'module:Class', got {value!r}")
        return value

    @model_validator(mode="after")
    def _cpu_cache_holds_slots(self) -> EngineSettings:
        if self.max_loras is None:
            self.max_loras = min(DEFAULT_MAX_LORAS, self.max_cpu_loras)
        if self.max_cpu_loras < self.max_loras:
            raise ValueError("max_cpu_loras must be >= max_loras (vLLM refuses otherwise)")
        return self

    def for_model(self, model_dir: Path | None) -> EngineSettings:
        """These settings with every unset model-dependent value taken from the model.

        Order: the setting, else the manifest's engine hint (`fedpersona.json`), else the
        model's `config.json` (`max_position_embeddings`, capped at 2048), else a default that
        suits the CPU build. A model whose own limit is below `max_model_len` would make vLLM
        refuse to start, so the setting is the only way above the model's.
        """
        hints = None
        limit = None
        if model_dir is not None:
            with contextlib.suppress(ValueError, OSError):
                hints = read_model_manifest(model_dir).engine
            with contextlib.suppress(ValueError, OSError, KeyError, TypeError):
                config = json.loads((Path(model_dir) / "config.json").read_text())
                limit = int(config["max_position_embeddings"])

        def pick(name: str, fallback: object) -> object:
            value = getattr(self, name)
            if value is None and hints is not None:
                value = getattr(hints, name, None)
            return fallback if value is None else value

        return self.model_copy(
            update={
                "max_model_len": pick(
                    "max_model_len", min(limit, DEFAULT_MAX_MODEL_LEN) if limit else 1024
                ),
                "kv_cache_gib": pick("kv_cache_gib", DEFAULT_KV_CACHE_GIB),
                "dtype": pick("dtype", "float32"),
                "gpu_memory_utilization": pick("gpu_memory_utilization", None),
            }
        )

    @property
    def supervised(self) -> bool:
        """True when the gateway starts vLLM itself (no url configured)."""
        return self.url is None

    @property
    def base_url(self) -> str:
        """Where the gateway sends requests: the configured url, else the local child's."""
        if self.url is not None:
            return self.url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"


@dataclass(frozen=True)
class EngineLaunch:
    """Everything needed to start one vLLM server: the argv, the env overrides, the address."""

    argv: list[str]
    env: dict[str, str] = field(repr=False)
    base_url: str
    served_model_name: str
    unset_env: tuple[str, ...] = field(default=_RESOLVER_ENV)
    # The CPUs the vLLM process runs on (None: those of whoever starts it). Set where the
    # gateway moves itself off the engine's cores: its child must not inherit the gateway's.
    cpus: frozenset[int] | None = None

    @property
    def api_key(self) -> str:
        """The key the gateway must send (vLLM's `VLLM_API_KEY` in `env`)."""
        return self.env.get(ENGINE_API_KEY_ENV, "")

    def public_env(self) -> dict[str, str]:
        """`env` with secrets replaced, for logs and printing."""
        return {k: ("<redacted>" if k in _SECRET_ENV else v) for k, v in self.env.items()}

    def environ(self, base: Mapping[str, str]) -> dict[str, str]:
        """The child's full environment: `base` minus resolver variables, plus `env`."""
        merged = {k: v for k, v in base.items() if k not in self.unset_env}
        merged.update(self.env)
        return merged

    def shell(self) -> str:
        """The launch as one shell line, secrets redacted (it is written to the engine log)."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.public_env().items()))
        return f"{env} {shlex.join(self.argv)}"


def engine_argv(
    settings: EngineSettings, *, model_dir: Path, served_model_name: str, python: str
) -> list[str]:
    """The vLLM OpenAI server's argv. Pure: no I/O."""
    argv = [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        served_model_name,
        "--enable-lora",
        "--max-loras",
        str(settings.max_loras),
        "--max-cpu-loras",
        str(settings.max_cpu_loras),
        "--max-lora-rank",
        str(settings.max_lora_rank),
        "--max-model-len",
        str(settings.max_model_len or DEFAULT_MAX_MODEL_LEN),
        "--dtype",
        settings.dtype or "float32",
        "--host",
        settings.host,
        "--port",
        str(settings.port),
        # The gateway logs every request; vLLM's per-request access log would double it.
        "--disable-uvicorn-access-log",
        # Every path but /health and /metrics needs the key (vLLM's own check leaves some open).
        "--middleware",
        GUARD_MIDDLEWARE,
    ]
    # The chart's GPU values pass their own fraction through extra_args; that one wins.
    explicit = any(a.split("=", 1)[0] == "--gpu-memory-utilization" for a in settings.extra_args)
    if settings.gpu_memory_utilization is not None and not explicit:
        argv += ["--gpu-memory-utilization", str(settings.gpu_memory_utilization)]
    if settings.proxy_small_model is not None:
        argv += ["--logits-processors", settings.proxy_processor]
    return argv + list(settings.extra_args)


def engine_env(settings: EngineSettings, *, store_dir: Path, api_key: str) -> dict[str, str]:
    """Environment overrides for the vLLM child. Pure: no I/O."""
    if not api_key:
        raise ValueError("the engine needs an API key")
    env = {
        ENGINE_API_KEY_ENV: api_key,
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "VLLM_CPU_KVCACHE_SPACE": str(settings.kv_cache_gib or DEFAULT_KV_CACHE_GIB),
        # An allow-list naming no plugin: the LoRA resolver plugins stay off (see _RESOLVER_ENV).
        "VLLM_PLUGINS": "",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    if settings.cpu_cores is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = settings.cpu_cores
    if settings.proxy_small_model is not None:
        env[PROXY_SMALL_MODEL_ENV] = str(settings.proxy_small_model)
        env[PROXY_STORE_ENV] = str(store_dir)
    return env


def engine_key(settings: EngineSettings) -> str:
    """The configured engine key, else a new random one (256 bits)."""
    if settings.api_key is not None and settings.api_key.get_secret_value():
        return settings.api_key.get_secret_value()
    return secrets.token_urlsafe(32)


def build_launch(
    settings: EngineSettings,
    *,
    home: Path,
    store_dir: Path | None = None,
    python: str = sys.executable,
    cpus: frozenset[int] | None = None,
) -> EngineLaunch:
    """Resolve defaults against `home` and build the launch the supervisor runs.

    The engine key is `settings.api_key`, else a fresh random one (embedded mode: the gateway
    reads it from the launch). Raises `InvalidManifest` (a `ValueError`) when no served name is
    configured and the model directory has no valid `fedpersona.json`. `cpus`: the CPUs the
    vLLM process runs on (`placement.Placement.engine`; None: its starter's).
    """
    layout = Home(home)
    model_dir = (settings.model_dir or layout.large_model).resolve()
    served = settings.served_model_name or read_model_manifest(model_dir).name
    settings = settings.for_model(model_dir)
    store = (store_dir or layout.store).resolve()
    return EngineLaunch(
        argv=engine_argv(settings, model_dir=model_dir, served_model_name=served, python=python),
        env=engine_env(settings, store_dir=store, api_key=engine_key(settings)),
        base_url=settings.base_url,
        served_model_name=served,
        cpus=cpus,
    )
