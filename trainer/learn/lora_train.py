"""Local LoRA training on the CPU: one or more PEFT LoRAs on a frozen Llama base, trained jointly.

`LoraSession` wraps a freshly loaded base model with named PEFT LoRA adapters (e.g. one
"global" and one "personal" for PFTT), all active at once, and moves their weights in and out
as `Params` (numpy float32 arrays under PEFT's saved key names, the names `adapters.LoraAdapter`
and vLLM use). `LocalTrainer` runs Adam steps on chosen adapters over deterministic batches,
with an optional FedProx term and optional fixed sparsity masks (PerFIT), and can accumulate
first-order Taylor importance scores `|w * dL/dw|`.

Determinism: float32 on the CPU, LoRA initialization seeded by the session seed, batch order
seeded by the caller; two runs with the same inputs give identical tensors. This module knows
nothing about federated aggregation or about which method is running.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from fedpersona.adapters import LoraAdapter
from fedpersona.trainer.data.silo import Example, batch_order, collate
from fedpersona.trainer.errors import MethodError
from fedpersona.trainer.methods.base import LoraSpec, Params, TrainConfig, adapter_from_params
from fedpersona.trainer.models.basemodel import ModelInfo
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

log = logging.getLogger(__name__)

_PARAM_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.(?P<adapter>[^.]+)\.weight$")


def load_tokenizer(model_dir: Path) -> Any:
    """The tokenizer (with chat template) saved in a base model directory.

    Cached per directory identity (inode and modification time), so a model rebuilt and swapped
    into the same path is not paired with a stale tokenizer.
    """
    info = Path(model_dir).stat()
    return _cached_tokenizer(str(model_dir), (info.st_ino, info.st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _cached_tokenizer(model_dir: str, identity: tuple[int, int]) -> Any:
    return AutoTokenizer.from_pretrained(model_dir)


def load_base_model(base_model: ModelInfo) -> torch.nn.Module:
    """A fresh float32 copy of the base model, frozen and in eval mode, on the CPU."""
    # Hundreds of client rounds load the base model; their per-load progress bars are noise.
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(base_model.path), dtype=torch.float32)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    model.requires_grad_(False)
    model.eval()
    return model


def lora_config(spec: LoraSpec) -> LoraConfig:
    """The PEFT config of `spec`: plain LoRA that vLLM serves (no dropout, no bias, no DoRA)."""
    return LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,  # type: ignore[arg-type]  # PEFT annotates int, uses any number
        target_modules=list(spec.target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )


class LoraSession:
    """A base model with named LoRA adapters attached, all active (their updates add up)."""

    def __init__(self, base_model: ModelInfo, specs: Mapping[str, LoraSpec], *, seed: int) -> None:
        if not specs:
            raise MethodError("a LoRA session needs at least one adapter")
        self.base_model = base_model
        self.specs = dict(specs)
        self.tokenizer = load_tokenizer(Path(base_model.path))
        names = list(self.specs)
        base = load_base_model(base_model)
        # LoRA A matrices are drawn from torch's global generator when adapters are attached;
        # fork it so seeding here leaves the caller's random state alone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                peft_model = get_peft_model(
                    base, lora_config(self.specs[names[0]]), adapter_name=names[0]
                )
                for name in names[1:]:
                    peft_model.add_adapter(name, lora_config(self.specs[name]))
            except ValueError as e:  # e.g. target modules the model does not have
                raise MethodError(f"cannot attach LoRA to {base_model.name}: {e}") from e
        # Activate all adapters at once: the forward pass sums their updates.
        cast(Any, peft_model.base_model).set_adapter(names)
        self.model: PeftModel = peft_model
        self._params: dict[str, dict[str, torch.nn.Parameter]] = {name: {} for name in names}
        for full_name, param in peft_model.named_parameters():
            match = _PARAM_RE.match(full_name)
            if match is None or match["adapter"] not in self._params:
                continue
            key = f"{match['module']}.lora_{match['which']}.weight"
            self._params[match["adapter"]][key] = param
        for name, found in self._params.items():
            if not found:
                raise MethodError(f"adapter {name!r}: no LoRA weights were attached")

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)

    def parameters(self, adapter: str) -> dict[str, torch.nn.Parameter]:
        """`adapter`'s trainable tensors under PEFT's saved key names."""
        return self._params[adapter]

    def read(self, adapter: str) -> Params:
        """A copy of `adapter`'s weights as float32 numpy arrays."""
        return {
            key: param.detach().cpu().numpy().astype(np.float32, copy=True)
            for key, param in sorted(self._params[adapter].items())
        }

    def write(self, adapter: str, params: Mapping[str, np.ndarray]) -> None:
        """Overwrite `adapter`'s weights; keys and shapes must match exactly."""
        own = self._params[adapter]
        if set(params) != set(own):
            missing, extra = sorted(set(own) - set(params)), sorted(set(params) - set(own))
            raise MethodError(
                f"parameters for adapter {adapter!r} do not match its LoRA: "
                f"missing {missing[:3]}, unexpected {extra[:3]}"
            )
        with torch.no_grad():
            for key, param in own.items():
                value = np.asarray(params[key], dtype=np.float32)
                if tuple(value.shape) != tuple(param.shape):
                    raise MethodError(
                        f"{adapter}/{key}: shape {value.shape} != expected {tuple(param.shape)}"
                    )
                param.copy_(torch.from_numpy(value))

    def adapter(self, adapter: str) -> LoraAdapter:
        """`adapter` as a servable `LoraAdapter` for this base model."""
        return adapter_from_params(
            self.read(adapter), spec=self.specs[adapter], base_model=self.base_model.name
        )


class LocalTrainer:
    """Adam on some adapters of a `LoraSession`, over deterministic batches of `examples`.

    - `prox`: adapter -> anchor params; adds `prox_mu / 2 * ||w - anchor||^2` (FedProx).
    - `masks`: adapter -> {key: 0/1 array}; masked entries get no gradient and stay zero.
    - `key_filters`: adapter -> predicate on its keys; only the keys it accepts train (None or
      absent: all of them). Adapters not in `adapters` and rejected keys stay frozen.
    """

    def __init__(
        self,
        session: LoraSession,
        examples: Sequence[Example],
        *,
        config: TrainConfig,
        adapters: Sequence[str],
        order_seed: Sequence[int],
        prox: Mapping[str, Params] | None = None,
        key_filters: Mapping[str, Callable[[str], bool] | None] | None = None,
    ) -> None:
        self.session = session
        self.examples = list(examples)
        self.config = config
        filters = key_filters or {}
        self._params = [
            (name, key, p)
            for name in adapters
            for key, p in session.parameters(name).items()
            if filters.get(name) is None or filters[name](key)  # type: ignore[misc]
        ]
        if not self._params:
            raise MethodError(f"nothing to train in adapters {list(adapters)}")
        # Everything else stays frozen: no gradient is computed for it, no step moves it.
        for name in session.specs:
            for param in session.parameters(name).values():
                param.requires_grad_(False)
        for _, _, param in self._params:
            param.requires_grad_(True)
        self._optimizer = torch.optim.Adam([p for _, _, p in self._params], lr=config.lr)
        self._order: Iterator[list[int]] = batch_order(
            len(self.examples), batch_size=config.batch_size, seed=order_seed
        )
        self._anchors: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        if config.prox_mu > 0 and prox:
            for name, anchor in prox.items():
                for key, param in session.parameters(name).items():
                    self._anchors.append((param, torch.tensor(np.asarray(anchor[key]))))
        self._masks: dict[int, torch.Tensor] = {}
        self.losses: list[float] = []

    def set_masks(self, masks: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        """Fix sparsity masks (adapter -> key -> 0/1) and zero the masked-out weights now."""
        self._masks = {}
        for name, by_key in masks.items():
            for key, mask in by_key.items():
                param = self.session.parameters(name)[key]
                tensor = torch.tensor(np.asarray(mask, dtype=np.float32))
                self._masks[id(param)] = tensor
                with torch.no_grad():
                    param.mul_(tensor)

    def _loss(self, indices: list[int]) -> torch.Tensor:
        batch = collate([self.examples[i] for i in indices], pad_id=self.session.pad_id)
        out = self.session.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
        )
        loss: torch.Tensor = out.loss
        return loss

    def step(self) -> float:
        """One optimizer step; returns the batch's language-model loss (without the prox term)."""
        self.session.model.train()
        loss = self._loss(next(self._order))
        total = loss
        if self._anchors:
            prox = sum(((p - a) ** 2).sum() for p, a in self._anchors)
            total = loss + self.config.prox_mu / 2 * prox
        self._optimizer.zero_grad(set_to_none=True)
        total.backward()
        params = [p for _, _, p in self._params]
        for param in params:
            mask = self._masks.get(id(param))
            if mask is not None and param.grad is not None:
                param.grad.mul_(mask)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        self._optimizer.step()
        if self._masks:
            with torch.no_grad():
                for param in params:
                    mask = self._masks.get(id(param))
                    if mask is not None:
                        param.mul_(mask)  # Adam's momentum must not revive pruned entries
        value = float(loss.detach())
        self.losses.append(value)
        return value

    def run(self, steps: int) -> list[float]:
        return [self.step() for _ in range(steps)]

    def importance(self, adapter: str, *, batches: int) -> Params:
        """First-order Taylor importance `sum_b |w * dL_b/dw|` over `batches` batches.

        Does not change the weights (no optimizer step).
        """
        params = self.session.parameters(adapter)
        scores = {key: np.zeros(tuple(p.shape), dtype=np.float32) for key, p in params.items()}
        self.session.model.train()
        for _ in range(batches):
            for param in params.values():
                param.grad = None
            self._loss(next(self._order)).backward()
            for key, param in params.items():
                grad = param.grad if param.grad is not None else torch.zeros_like(param)
                scores[key] += (param.detach() * grad).abs().numpy()
        self._optimizer.zero_grad(set_to_none=True)
        return scores

    def metrics(self) -> dict[str, float]:
        if not self.losses:
            return {}
        return {
            "train_loss": float(np.mean(self.losses)),
            "train_loss_first": self.losses[0],
            "train_loss_last": self.losses[-1],
            "train_steps": float(len(self.losses)),
            "train_examples": float(len(self.examples)),
        }
