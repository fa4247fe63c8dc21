"""`ModelManifest`: what a served model directory is, read from its `fedpersona.json`.

Every base model directory (`<home>/models/large`, `<home>/models/small`, or one an operator
points the engine at) carries a manifest. Its `name` is the model's public identity: vLLM serves
the large model under `--served-model-name <name>`, every LoRA trained on it records it as
`base_model_name_or_path`, and the proxy-tuning processor checks experts against the small
model's. The other fields describe the model for operators and give the engine start-up hints;
all of them are optional, and unknown fields are kept (builders record extra facts, such as a
recipe, that readers ignore).

One reader, one behaviour, for the embedded and the external engine alike: a directory without
a readable, valid manifest is refused with `InvalidManifest` naming the file and the field;
there is no fallback to the directory's name (a renamed directory would silently change the
base model every adapter must match). The writer replaces the file atomically.

Knows nothing about torch, transformers or vLLM; only reads and writes this one JSON file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from fedpersona.adapters.durable import write_json_atomic
from fedpersona.adapters.errors import InvalidManifest
from fedpersona.adapters.limits import VLLM_LORA_RANKS
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MANIFEST_FILE = "fedpersona.json"


class _Part(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow", populate_by_name=True)


class TokenizerInfo(_Part):
    """The tokenizer saved with the model (large and small model must share it for FedPT)."""

    class_name: str | None = Field(default=None, alias="class")
    vocab_size: int | None = Field(default=None, ge=1)
    chat_template: bool | None = None
    eos_token: str | None = None


class ModelSource(_Part):
    """Where the weights came from (an imported file or directory, or a build recipe)."""

    kind: str | None = None  # "gguf", "hf", "recipe", ...
    file: str | None = None
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")


class EngineHints(_Part):
    """vLLM settings that suit the model; the engine's settings may override every one."""

    max_model_len: int | None = Field(default=None, ge=16)
    max_lora_rank: int | None = None
    dtype: str | None = None
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    kv_cache_gib: int | None = Field(default=None, ge=1)  # VLLM_CPU_KVCACHE_SPACE (CPU build)

    @field_validator("max_lora_rank")
    @classmethod
    def _known_rank(cls, value: int | None) -> int | None:
        if value is not None and value not in VLLM_LORA_RANKS:
            raise ValueError(f"must be one of {VLLM_LORA_RANKS}, got {value}")
        return value


class ModelManifest(_Part):
    """The contents of `fedpersona.json`. Only `name` is required."""

    name: str = Field(min_length=1, pattern=r"^\S+$")
    role: Literal["large", "small"] | None = None
    architecture: str | None = None  # e.g. "LlamaForCausalLM"
    num_parameters: int | None = Field(default=None, ge=0)
    tokenizer: TokenizerInfo | None = None
    source: ModelSource | None = None
    license: str | None = None
    engine: EngineHints | None = None
    recipe_hash: str | None = None  # built models: the recipe that made them (cache key)

    @classmethod
    def parse(cls, data: object, *, where: str = MANIFEST_FILE) -> ModelManifest:
        """Validate `data`; raises `InvalidManifest` naming `where` and every bad field."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise InvalidManifest(f"{where}: {_describe(e)}") from e

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to disk (unset fields left out, unknown fields kept)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def manifest_path(model_dir: str | Path) -> Path:
    return Path(model_dir) / MANIFEST_FILE


def read_model_manifest(model_dir: str | Path) -> ModelManifest:
    """The manifest of `model_dir`; `InvalidManifest` if it is missing, unreadable or invalid."""
    path = manifest_path(model_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise InvalidManifest(
            f"{path} is missing: {model_dir} is not a fedpersona model directory (build one "
            "with `fedpersona models bootstrap`, or write a fedpersona.json naming the model)"
        ) from e
    except OSError as e:
        raise InvalidManifest(f"{path}: unreadable: {e}") from e
    try:
        data = json.loads(text)
    except ValueError as e:
        raise InvalidManifest(f"{path}: not valid JSON: {e}") from e
    return ModelManifest.parse(data, where=str(path))


def model_name(model_dir: str | Path) -> str:
    """The name `model_dir` is served and known by: its manifest's `name` (strict, as above)."""
    return read_model_manifest(model_dir).name


def write_model_manifest(model_dir: str | Path, manifest: ModelManifest) -> Path:
    """Write `manifest` into `model_dir` atomically (readers see the old file or the new one)."""
    path = manifest_path(model_dir)
    write_json_atomic(path, manifest.to_json(), indent=2, sort_keys=True)
    return path


def _describe(error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(document)"
        problems.append(f"field {field!r}: {item['msg']}")
    return "; ".join(problems)
