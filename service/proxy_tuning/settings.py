"""Settings of the proxy-tuning logits processor (env prefix `FEDPERSONA_`).

The engine launch (`fedpersona.service.engine.config.engine_env`) passes
`FEDPERSONA_PROXY_SMALL_MODEL` and `FEDPERSONA_STORE_DIR` (the gateway's name for the store
root; the older `FEDPERSONA_STORE` is still read, deprecated) to the vLLM process; the rest are
optional knobs. Built by the processor when vLLM constructs it, never at import time.
"""

from __future__ import annotations

from pathlib import Path

from fedpersona.adapters.limits import EXPERT_MAX_RANK
from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ProxySettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="FEDPERSONA_", extra="ignore", populate_by_name=True
    )

    proxy_small_model: Path = Field(description="small base model dir (Hugging Face format)")
    store_dir: Path = Field(
        validation_alias=AliasChoices("FEDPERSONA_STORE_DIR", "FEDPERSONA_STORE"),
        description="root of the adapter store holding the experts (FEDPERSONA_STORE: deprecated)",
    )
    proxy_max_experts: int = Field(
        default=4,
        ge=1,
        description="loaded experts (LoRA factors) kept in memory (LRU), besides in-flight ones",
    )
    proxy_max_rank: int = Field(
        default=EXPERT_MAX_RANK, ge=1, description="largest expert LoRA rank accepted"
    )
    proxy_max_alpha: float = Field(
        default=10.0, gt=0, description="largest accepted |fedpersona_alpha|"
    )
    proxy_top_k: int = Field(
        default=0,
        ge=0,
        description="0 (default): exact offsets over the whole vocabulary. k > 0: APPROXIMATE, "
        "offsets only for the large model's top-k tokens per step, every other token masked",
    )
    proxy_stats_file: Path | None = Field(
        default=None,
        description="if set, the processor rewrites this JSON file with its counters (live "
        "requests, KV bytes, loads, failures) whenever the batch changes; for tests and ops",
    )
