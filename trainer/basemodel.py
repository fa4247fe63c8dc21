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

The default corpus is the rendered multi-persona chats of `trainer.personas`. This module knows
nothing about LoRA, federated learning or serving.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from trainer import personas
from trainer.errors import DataError
from trainer.tokenizer import render_chat, train_tokenizer

log = logging.getLogger(__name__)

# Bump when the build procedure changes in a way the recipe fields do not capture.
BUILD_VERSION = 2
HEAD_DIM = 64  # the vLLM CPU attention kernels reject smaller heads
ROLES: tuple[str, ...] = ("large", "small")
MARKER = "fedpersona.json"


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
            _build_into(staging, recipe, corpus, progress=progress)
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


def _swap_in(new: Path, target: Path) -> None:
    """Replace `target` by `new` with renames (same file system), never a partial copy."""
    old = target.with_name(f".old-{target.name}-{uuid.uuid4().hex}")
    if target.exists():
        os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _deterministic_torch(threads: int) -> Iterator[None]:
    previous_threads = torch.get_num_threads()
    previous_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(previous_threads)
        torch.use_deterministic_algorithms(previous_det)


def _llama_config(
    size: ModelSize, recipe: Recipe, tokenizer: PreTrainedTokenizerFast
) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        head_dim=HEAD_DIM,
        max_position_embeddings=recipe.max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


def _build_into(staging: Path, recipe: Recipe, corpus: str, *, progress: bool) -> None:
    tokenizer = train_tokenizer(
        [corpus],
        vocab_size=recipe.vocab_size,
        model_max_length=recipe.max_position_embeddings,
    )
    # The backend encodes the whole corpus at once without the per-sequence length warning.
    encoded = tokenizer.backend_tokenizer.encode(corpus, add_special_tokens=False)
    ids = torch.tensor(encoded.ids, dtype=torch.long)
    if ids.numel() < recipe.seq_len + 2:
        raise DataError(
            f"corpus is too short: {ids.numel()} tokens, need at least {recipe.seq_len + 2}"
        )
    with _deterministic_torch(threads=1):
        models: dict[str, LlamaForCausalLM] = {}
        for offset, role in enumerate(ROLES):
            torch.manual_seed(recipe.seed + offset)
            models[role] = LlamaForCausalLM(_llama_config(recipe.size(role), recipe, tokenizer))
        losses = _pretrain(models, ids, recipe, progress=progress)
    for role, model in models.items():
        target = staging / role
        model.eval()
        gen = model.generation_config
        gen.bos_token_id = tokenizer.bos_token_id
        gen.eos_token_id = tokenizer.eos_token_id
        gen.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
        marker = {
            "name": recipe.model_name(role),
            "recipe_hash": recipe.hash(),
            "role": role,
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "final_loss": round(losses[role], 4) if losses else None,
            "recipe": dataclasses.asdict(recipe),
        }
        (target / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        # transformers writes the weights through a private (0600) temp file; the serving
        # process may run as another user.
        for path in target.iterdir():
            path.chmod(0o644)


def _lr_at(step: int, recipe: Recipe) -> float:
    warmup = max(1, recipe.steps // 10)
    if step < warmup:
        return recipe.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, recipe.steps - warmup)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _pretrain(
    models: dict[str, LlamaForCausalLM],
    ids: torch.Tensor,
    recipe: Recipe,
    *,
    progress: bool,
) -> dict[str, float]:
    """Next-token AdamW on random windows of `ids`; both models see the same batches."""
    if recipe.steps == 0:
        return {}
    generator = torch.Generator().manual_seed(recipe.seed)
    optimizers = {
        role: torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)
        for role, model in models.items()
    }
    for model in models.values():
        model.train()
    losses: dict[str, float] = {}
    with _progress(progress, recipe) as advance:
        for step in range(recipe.steps):
            starts = torch.randint(
                0, ids.numel() - recipe.seq_len - 1, (recipe.batch_size,), generator=generator
            )
            batch = torch.stack([ids[s : s + recipe.seq_len] for s in starts.tolist()])
            for role, model in models.items():
                optimizer = optimizers[role]
                for group in optimizer.param_groups:
                    group["lr"] = _lr_at(step, recipe)
                loss = model(input_ids=batch, labels=batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses[role] = float(loss.detach())
            advance(losses)
    log.info("pretraining done: %s", ", ".join(f"{r} loss {v:.3f}" for r, v in losses.items()))
    return losses


@contextlib.contextmanager
def _progress(enabled: bool, recipe: Recipe) -> Iterator[Callable[[dict[str, float]], None]]:
    """A rich progress bar over pretraining steps (or a no-op), advanced with the last losses."""
    if not enabled:
        yield lambda losses: None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("[bold]pretraining {task.fields[recipe]}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[losses]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns) as bar:
        task = bar.add_task("pretrain", total=recipe.steps, recipe=recipe.name, losses="")

        def advance(losses: dict[str, float]) -> None:
            text = " ".join(f"{role} {value:.3f}" for role, value in losses.items())
            bar.update(task, advance=1, losses=text)

        yield advance
