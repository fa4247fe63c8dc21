"""Held-out perplexity of a base model with (or without) a LoRA adapter, on a user's silo.

Perplexity is `exp(total NLL / total target tokens)` over the assistant tokens of every chat of
the split (the same labels training uses, see `fedpersona.trainer.data.silo`), i.e. a
token-weighted mean, so
long replies count in proportion to their length. The adapter is merged into a fresh copy of the
base weights exactly as vLLM applies it (`W += alpha / r * B @ A`), so what is evaluated is what
is served. This module knows nothing about federated methods.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from fedpersona.adapters import LoraAdapter
from fedpersona.trainer.data.silo import (
    IGNORE_INDEX,
    Example,
    collate,
    load_examples,
    sequential_batches,
)
from fedpersona.trainer.errors import MethodError
from fedpersona.trainer.learn.lora_train import load_base_model, load_tokenizer
from fedpersona.trainer.models.basemodel import ModelInfo

_PEFT_PREFIX = "base_model.model."


def merge_adapter(model: torch.nn.Module, adapter: LoraAdapter) -> None:
    """Add `adapter`'s update to `model`'s weights in place (exact, float32)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for peft_name in adapter.modules():
            name = peft_name.removeprefix(_PEFT_PREFIX)
            target = modules.get(name)
            weight = getattr(target, "weight", None)
            if not isinstance(weight, torch.Tensor):
                raise MethodError(
                    f"adapter module {peft_name!r} is not a linear layer of the model"
                )
            delta = adapter.delta(peft_name).to(weight.dtype)
            if delta.shape != weight.shape:
                raise MethodError(
                    f"adapter module {peft_name!r}: update shape {tuple(delta.shape)} does not "
                    f"match the weight {tuple(weight.shape)}"
                )
            weight.add_(delta)


def token_nll(
    model: torch.nn.Module, examples: Sequence[Example], *, pad_id: int, batch_size: int = 8
) -> tuple[float, int]:
    """(sum of NLL over label tokens, number of label tokens) of `model` on `examples`."""
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for chunk in sequential_batches(examples, batch_size=batch_size):
            batch = collate(chunk, pad_id=pad_id)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            shifted = logits[:, :-1, :].reshape(-1, logits.shape[-1]).float()
            targets = batch.labels[:, 1:].reshape(-1)
            total += float(
                F.cross_entropy(shifted, targets, ignore_index=IGNORE_INDEX, reduction="sum")
            )
            count += int((targets != IGNORE_INDEX).sum())
    model.train(was_training)
    return total, count


def perplexity(
    base_model: ModelInfo,
    adapter: LoraAdapter | None,
    silo: Path,
    split: str = "eval",
    *,
    max_len: int = 512,
    batch_size: int = 8,
) -> float:
    """Perplexity of `base_model` (+ `adapter`) on the assistant tokens of `silo`'s `split`."""
    if adapter is not None and adapter.base_model != base_model.name:
        raise MethodError(
            f"adapter was trained on {adapter.base_model!r}, not on {base_model.name!r}"
        )
    tokenizer = load_tokenizer(Path(base_model.path))
    examples = load_examples(silo, split, tokenizer, max_len=max_len)
    model = load_base_model(base_model)
    if adapter is not None:
        merge_adapter(model, adapter)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    total, count = token_nll(model, examples, pad_id=int(pad), batch_size=batch_size)
    return math.exp(total / count)
