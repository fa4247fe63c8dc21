"""Proxy experts: how a request names one, and how one is checked, loaded and cached.

An expert is the small base model with a LoRA from the adapter store. The processor keeps one
copy of the small model and loads an expert as its LoRA factors (`lora_rows.ExpertWeights`,
checked against the small model's modules), so base and experts run in one batch;
`merge_lora` (a merged copy of the model) is the reference the tests and benchmarks compare
with. A request names it as `"<slot path>@<version id>"` in `vllm_xargs["fedpersona_expert"]`; the
name is parsed strictly by `fedpersona.adapters.refs.ExpertRef` (which owns the format, the
argument keys and the rule that only expert slots, `users/<u>/expert` and `global/expert`, are
accepted) and resolved only through `AdapterStore.get` (never as a raw path).

Loading refuses, with an error that names the problem: a small model whose tokenizer differs
from the large model's (`IncompatibleModels`, at engine start), and an expert that is missing,
invalid, trained on another base model, or whose modules do not fit the small model
(`ExpertUnavailable`, per request).

This module knows nothing about vLLM; `processor.py` calls it.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fedpersona.adapters import AdapterError, AdapterStore, InvalidName
from fedpersona.adapters.lora import LoraAdapter, load_lora
from fedpersona.adapters.refs import ALPHA_ARG, EXPERT_ARG, ExpertRef
from fedpersona.adapters.validation import validate_adapter
from fedpersona.service.proxy_tuning.errors import (
    ExpertUnavailable,
    IncompatibleModels,
    InvalidExpertRequest,
)
from fedpersona.service.proxy_tuning.lora_rows import ExpertWeights, expert_weights
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

logger = logging.getLogger(__name__)

DEFAULT_ALPHA = 1.0
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class ExpertRequest:
    """What one request asks of the processor: which expert, and how strongly."""

    ref: ExpertRef
    alpha: float

    @classmethod
    def from_extra_args(
        cls, extra: Mapping[str, Any] | None, *, max_alpha: float = 10.0
    ) -> ExpertRequest | None:
        """The request's expert, or None when it names none (then it is left untouched)."""
        if not extra or extra.get(EXPERT_ARG) is None:
            return None
        try:
            ref = ExpertRef.parse(extra[EXPERT_ARG])
        except InvalidName as e:
            raise InvalidExpertRequest(str(e)) from e
        alpha = extra.get(ALPHA_ARG, DEFAULT_ALPHA)
        if isinstance(alpha, bool) or not isinstance(alpha, int | float):
            raise InvalidExpertRequest(f"{ALPHA_ARG} must be a number, got {alpha!r}")
        if not math.isfinite(alpha) or abs(alpha) > max_alpha:
            raise InvalidExpertRequest(
                f"{ALPHA_ARG} must be finite with |alpha| <= {max_alpha}, got {alpha!r}"
            )
        return cls(ref, float(alpha))


def check_shared_tokenizer(*, large_tokenizer: str | Path, small_model: str | Path) -> int:
    """Refuse a small model whose tokenizer is not the large model's; return its size.

    Both must map every token string to the same id and agree on the special tokens; the
    returned size (`len(tokenizer)`) is how many logit columns proxy tuning touches (vLLM pads
    the large model's logits beyond it, and the small model's vocabulary may be padded too).
    """
    try:
        large = AutoTokenizer.from_pretrained(str(large_tokenizer))
        small = AutoTokenizer.from_pretrained(str(small_model))
    except (OSError, ValueError) as e:
        raise IncompatibleModels(f"cannot load the tokenizers to compare them: {e}") from e
    large_vocab, small_vocab = large.get_vocab(), small.get_vocab()
    if len(large_vocab) != len(small_vocab):
        raise IncompatibleModels(
            f"tokenizer mismatch: the large model's tokenizer ({large_tokenizer}) has "
            f"{len(large_vocab)} tokens, the small model's ({small_model}) {len(small_vocab)}"
        )
    differing = sorted(t for t, i in large_vocab.items() if small_vocab.get(t) != i)
    if differing:
        token = differing[0]
        raise IncompatibleModels(
            f"tokenizer mismatch: {len(differing)} token(s) differ between the large model's "
            f"tokenizer ({large_tokenizer}) and the small model's ({small_model}), e.g. "
            f"{token!r} is id {large_vocab[token]} vs {small_vocab.get(token)}"
        )
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(large, name) != getattr(small, name):
            raise IncompatibleModels(
                f"tokenizer mismatch: {name} is {getattr(large, name)} for the large model "
                f"and {getattr(small, name)} for the small model"
            )
    return len(large)


def load_small_model(model_dir: Path, *, device: torch.device | str = "cpu") -> PreTrainedModel:
    """The small base model in float32, eval mode, gradients off."""
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise IncompatibleModels(f"cannot load the small model from {model_dir}: {e}") from e
    torch.nn.Module.to(model, torch.device(device))
    model.eval()
    model.requires_grad_(False)
    return model


def merge_lora(base: torch.nn.Module, adapter: LoraAdapter, *, where: str) -> torch.nn.Module:
    """A copy of `base` with `alpha / r * B @ A` added to every adapted module's weight."""
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for key, (a, b) in adapter.modules().items():
            name = key.removeprefix(_PEFT_PREFIX)
            try:
                module = merged.get_submodule(name)
            except AttributeError as e:
                raise ExpertUnavailable(
                    f"expert {where}: module {key!r} does not exist in the small model"
                ) from e
            weight = getattr(module, "weight", None)
            delta = adapter.scaling * (b.to(torch.float32) @ a.to(torch.float32))
            if not isinstance(weight, torch.Tensor) or weight.shape != delta.shape:
                shape = None if weight is None else tuple(weight.shape)
                raise ExpertUnavailable(
                    f"expert {where}: module {key!r} has weight shape {shape}, the LoRA's "
                    f"update is {tuple(delta.shape)}: trained for another model"
                )
            weight.add_(delta.to(device=weight.device, dtype=weight.dtype))
    return merged


class ExpertLibrary:
    """Resolves expert names through the store, validates them and caches loaded experts.

    `check` (cheap: config and weights are read and validated, nothing is loaded onto the
    model) is what the frontend runs before accepting a request; `get` returns the expert's
    factors checked against the small model (`ExpertWeights`), keeping at most `capacity` of
    them (least recently used out). Versions are immutable, so a cached entry never goes
    stale. Thread-safe.
    """

    def __init__(
        self,
        *,
        store: AdapterStore,
        base: torch.nn.Module | None,
        base_name: str,
        capacity: int,
        max_rank: int,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self._store = store
        self._base = base
        self._base_name = base_name
        self._capacity = capacity
        self._max_rank = max_rank
        self._models: OrderedDict[ExpertRef, ExpertWeights] = OrderedDict()
        self._checked: OrderedDict[ExpertRef, None] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0

    def __len__(self) -> int:
        return len(self._models)

    def _adapter(self, ref: ExpertRef) -> LoraAdapter:
        try:
            version = self._store.get(ref.slot, ref.version)
            adapter = load_lora(version.path)
            return validate_adapter(
                adapter, max_rank=self._max_rank, base_model=self._base_name, where=str(ref)
            )
        except AdapterError as e:
            raise ExpertUnavailable(f"proxy expert {ref} is not available: {e}") from e

    def check(self, ref: ExpertRef) -> None:
        """Raise `ExpertUnavailable` unless `ref` exists and is a valid expert LoRA."""
        with self._lock:
            if ref in self._checked or ref in self._models:
                return
        self._adapter(ref)
        with self._lock:
            self._checked[ref] = None
            while len(self._checked) > 1024:
                self._checked.popitem(last=False)

    def get(self, ref: ExpertRef) -> ExpertWeights:
        """The expert `ref`'s LoRA factors for the small model (loaded on first use)."""
        if self._base is None:
            raise RuntimeError("this ExpertLibrary was built without a base model (check only)")
        with self._lock:
            model = self._models.get(ref)
            if model is not None:
                self._models.move_to_end(ref)
                return model
        model = expert_weights(self._base, self._adapter(ref), where=str(ref))
        with self._lock:
            self._models[ref] = model
            self._models.move_to_end(ref)
            self.loads += 1
            while len(self._models) > self._capacity:
                evicted, _ = self._models.popitem(last=False)
                logger.info("evicted proxy expert %s from the cache", evicted)
        logger.info("loaded proxy expert %s", ref)
        return model
