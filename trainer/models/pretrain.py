"""Pretraining of the base models: the torch side of
`fedpersona.trainer.models.basemodel.build_models`.

`write_models(staging, recipe, corpus)` trains the shared tokenizer on the corpus, initializes the
large and small Llama from the recipe's seed, pretrains both on the same random windows of the
corpus (next-token loss, AdamW, warmup then cosine) and saves them, each with its
`fedpersona.json`, under `<staging>/large` and `<staging>/small`. Runs single-threaded with
deterministic algorithms, so the same recipe and corpus give byte-identical weights.

Kept apart from `basemodel` so that recipes, the cache check and the CLI never import torch;
both import the recipe types from `recipe`, so neither imports the other at module level.
This module knows nothing about the cache, atomic renames or where models finally live.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from fedpersona.adapters.manifest import ModelManifest, write_model_manifest
from fedpersona.trainer.errors import DataError
from fedpersona.trainer.models.recipe import HEAD_DIM, MARKER, ROLES, ModelSize, Recipe
from fedpersona.trainer.models.tokenizer import train_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

log = logging.getLogger(__name__)

# Fixed, not taken from the machine: the thread count can change float reductions.
THREADS = 1


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


def write_models(staging: Path, recipe: Recipe, corpus: str, *, progress: bool) -> None:
    """Train the tokenizer and both models on `corpus`; save them under `staging/<role>`."""
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
    with _deterministic_torch(threads=THREADS):
        models: dict[str, LlamaForCausalLM] = {}
        for offset, role in enumerate(ROLES):
            with torch.random.fork_rng():  # seed the init without touching the caller's RNG
                torch.manual_seed(recipe.seed + offset)
                config = _llama_config(recipe.size(role), recipe, tokenizer)
                models[role] = LlamaForCausalLM(config)
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
        write_model_manifest(target, ModelManifest.parse(marker, where=str(target / MARKER)))
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
