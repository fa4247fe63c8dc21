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

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fedpersona.trainer.data import personas
from fedpersona.trainer.models.tokenizer import render_chat

log = logging.getLogger(__name__)

HEAD_DIM = 64  # the vLLM CPU attention kernels reject smaller heads
ROLES: tuple[str, ...] = ("large", "small")
MARKER = "fedpersona.json"

# Bump when the build procedure changes in a way the recipe fields do not capture.
BUILD_VERSION = 2


@dataclass(frozen=True)
class ModelSize:
    """Shape of one Llama model."""

    layers: int
    hidden: int
    heads: int
    intermediate: int

    def __post_init__(self) -> None:
        for field in ("layers", "hidden", "heads", "intermediate"):
            if getattr(self, field) < 1:
                raise ValueError(f"ModelSize.{field} must be positive, got {getattr(self, field)}")
        if self.hidden != self.heads * HEAD_DIM:
            raise ValueError(
                f"ModelSize.hidden ({self.hidden}) must equal heads ({self.heads}) x {HEAD_DIM}: "
                f"vLLM's CPU attention needs head_dim {HEAD_DIM}"
            )


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the built models; its `hash()` keys the cache."""

    name: str
    large: ModelSize
    small: ModelSize
    vocab_size: int
    max_position_embeddings: int
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    seed: int
    # chats per persona in the default corpus (ignored when a corpus is given)
    corpus_per_persona: int
    # sha256 of the pretraining text; filled in by `build_models` (`with_corpus`)
    corpus_sha256: str = ""

    def __post_init__(self) -> None:
        if not self.name.isidentifier() or not self.name.islower():
            raise ValueError(f"Recipe.name must be a lower-case identifier, got {self.name!r}")
        if self.steps < 0:
            raise ValueError(f"Recipe.steps must be >= 0, got {self.steps}")
        for field in ("batch_size", "seq_len", "corpus_per_persona"):
            if getattr(self, field) < 1:
                raise ValueError(f"Recipe.{field} must be positive, got {getattr(self, field)}")
        if self.seq_len > self.max_position_embeddings:
            raise ValueError(
                f"Recipe.seq_len ({self.seq_len}) exceeds max_position_embeddings "
                f"({self.max_position_embeddings})"
            )
        if not self.lr > 0:
            raise ValueError(f"Recipe.lr must be positive, got {self.lr}")

    def hash(self) -> str:
        """16 hex chars over every field and the build version."""
        payload = json.dumps(
            {"build_version": BUILD_VERSION, **dataclasses.asdict(self)}, sort_keys=True
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def with_corpus(self, text: str) -> Recipe:
        return dataclasses.replace(self, corpus_sha256=hashlib.sha256(text.encode()).hexdigest())

    def model_name(self, role: str) -> str:
        return f"fedpersona-{self.name}-{role}"

    def size(self, role: str) -> ModelSize:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
        return self.large if role == "large" else self.small


# Tests: builds in a few seconds, pretraining is a handful of steps.
MICRO = Recipe(
    name="micro",
    large=ModelSize(layers=2, hidden=128, heads=2, intermediate=256),
    small=ModelSize(layers=1, hidden=128, heads=2, intermediate=256),
    vocab_size=400,
    max_position_embeddings=512,
    steps=4,
    batch_size=4,
    seq_len=64,
    lr=3e-3,
    seed=0,
    corpus_per_persona=40,
)

# `fedpersona models bootstrap`: briefly pretrained, served by vLLM.
TINY = Recipe(
    name="tiny",
    large=ModelSize(layers=4, hidden=256, heads=4, intermediate=688),
    small=ModelSize(layers=2, hidden=128, heads=2, intermediate=344),
    vocab_size=2048,
    max_position_embeddings=1024,
    steps=150,
    batch_size=16,
    seq_len=128,
    lr=2e-3,
    seed=0,
    corpus_per_persona=300,
)

RECIPES: dict[str, Recipe] = {r.name: r for r in (MICRO, TINY)}


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
    with _locked(out_dir / ".lock"):
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
            _fsync_tree(staging)
            for role in ROLES:
                _swap_in(staging / role, out_dir / role)
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


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under `root`, so a rename never publishes lost data."""
    for path in [*sorted(root.rglob("*"), reverse=True), root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _swap_in(new: Path, target: Path) -> None:
    """Replace `target` by `new` with renames (same file system), never a partial copy."""
    old = target.with_name(f".old-{target.name}-{uuid.uuid4().hex}")
    if target.exists():
        os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)
