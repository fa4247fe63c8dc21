"""The tiny base models: a *large* and a *small* Llama sharing one tokenizer, built from a recipe.

`build_models(out_dir, recipe)` trains the tokenizer, initializes both models from a fixed seed,
pretrains them briefly (next-token loss, AdamW) on a corpus and saves them in Hugging Face format
(float32 safetensors, tokenizer with chat template, generation config whose eos is `<|end|>`)
under `<out_dir>/large` and `<out_dir>/small`, each with a `fedpersona.json`
(`{"name", "recipe_hash", "role", ...}`).

Builds are deterministic (same recipe and corpus -> byte-identical weight files) and cached: a
role directory whose `fedpersona.json` carries the recipe's hash is reused as is. A build happens
in a temporary directory that is renamed into place, under a file lock, so a crash or a second
process never leaves a half-written model where a reader looks.

The default corpus is the rendered multi-persona chats of `fedpersona.trainer.data.personas`. This
module knows
nothing about LoRA, federated learning or serving.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fedpersona.trainer.data import personas
from fedpersona.trainer.models.recipe import (  # noqa: F401  (re-exported: models' public names)
    BUILD_VERSION,
    HEAD_DIM,
    MARKER,
    MICRO,
    RECIPES,
    ROLES,
    TINY,
    ModelSize,
    Recipe,
)
from fedpersona.trainer.models.staging import fsync_tree, locked, swap_in
from fedpersona.trainer.models.tokenizer import render_chat

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    """A built model directory and the name it is served under."""

    path: Path
    name: str
    role: str
    recipe_hash: str
    num_parameters: int


@dataclass(frozen=True)
class ModelPair:
    large: ModelInfo
    small: ModelInfo
    cache_hit: bool
    seconds: float


def default_corpus(recipe: Recipe) -> str:
    """The rendered multi-persona chats every base model is pretrained on by default."""
    chats = personas.pretraining_conversations(recipe.corpus_per_persona, seed=recipe.seed)
    return "".join(render_chat(chat["messages"]) for chat in chats)


def read_marker(model_dir: Path) -> dict[str, object] | None:
    """The `fedpersona.json` of a model directory, or None if missing or unreadable."""
    try:
        data = json.loads((Path(model_dir) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def build_models(
    out_dir: Path,
    recipe: Recipe,
    corpus_text: str | None = None,
    *,
    progress: bool = True,
    force: bool = False,
) -> ModelPair:
    """Build (or reuse from cache) the large and small model of `recipe` under `out_dir`.

    `corpus_text` replaces the default persona corpus for both the tokenizer and pretraining.
    `force` rebuilds even on a cache hit. Raises `DataError` (a ValueError) for a corpus too
    short to pretrain on; nothing is written then.
    """
    started = time.monotonic()
    corpus = default_corpus(recipe) if corpus_text is None else corpus_text
    recipe = recipe.with_corpus(corpus)
    key = recipe.hash()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with locked(out_dir / ".lock"):
        if not force and all(_is_cached(out_dir / role, key) for role in ROLES):
            log.info("base models cache hit (recipe %s, hash %s) in %s", recipe.name, key, out_dir)
            return _pair(out_dir, recipe, cache_hit=True, started=started)
        log.info("building base models (recipe %s, hash %s) in %s", recipe.name, key, out_dir)
        staging = out_dir / f".build-{uuid.uuid4().hex}"
        try:
            from fedpersona.trainer.models import (
                pretrain,
            )  # torch and transformers: only when building

            pretrain.write_models(staging, recipe, corpus, progress=progress)
            fsync_tree(staging)
            for role in ROLES:
                swap_in(staging / role, out_dir / role)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return _pair(out_dir, recipe, cache_hit=False, started=started)


def _pair(out_dir: Path, recipe: Recipe, *, cache_hit: bool, started: float) -> ModelPair:
    infos = {}
    for role in ROLES:
        marker = read_marker(out_dir / role) or {}
        infos[role] = ModelInfo(
            path=out_dir / role,
            name=recipe.model_name(role),
            role=role,
            recipe_hash=recipe.hash(),
            num_parameters=int(str(marker.get("num_parameters", 0))),
        )
    return ModelPair(
        large=infos["large"],
        small=infos["small"],
        cache_hit=cache_hit,
        seconds=time.monotonic() - started,
    )


def _is_cached(model_dir: Path, key: str) -> bool:
    marker = read_marker(model_dir)
    return (
        marker is not None
        and marker.get("recipe_hash") == key
        and (model_dir / "model.safetensors").is_file()
    )
