"""The one random LoRA builder of the test suite: real PEFT key names, no training needed.

`random_lora` draws A and B from a seeded generator (in float64, then cast), for the chosen
target modules of the chosen layers of a Llama-shaped model. The shapes come from a `LlamaShape`:
`TINY_LLAMA` (hidden 128, 2 layers, the in-memory model of the adapter tests) by default, or
`LlamaShape.of(model_dir)` for a saved model (its config.json), so the same builder serves the
micro models of the integration tests. Scales: `scale` for both matrices by default (small,
valid deltas); `a_scale="fan_in"` with a large `scale` gives "random but strong" adapters that
visibly move a model's greedy answers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from fedpersona.adapters import LoraAdapter

BASE = "fedpersona-test-base"
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ALL_TARGETS = ATTENTION + MLP


@dataclass(frozen=True)
class LlamaShape:
    """The linear layers a LoRA can target in a Llama: sizes and layer count."""

    hidden: int
    intermediate: int
    layers: int
    q_out: int | None = None  # heads * head_dim; the hidden size unless the model says otherwise
    kv_out: int | None = None  # kv heads * head_dim

    @classmethod
    def of(cls, model_dir: Path) -> LlamaShape:
        config = json.loads((Path(model_dir) / "config.json").read_text())
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        return cls(
            hidden=config["hidden_size"],
            intermediate=config["intermediate_size"],
            layers=config["num_hidden_layers"],
            q_out=config["num_attention_heads"] * head_dim,
            kv_out=config["num_key_value_heads"] * head_dim,
        )

    def linear(self, target: str) -> tuple[str, int, int]:
        """(block, in_features, out_features) of `target`."""
        q_out = self.q_out or self.hidden
        kv_out = self.kv_out or self.hidden
        return {
            "q_proj": ("self_attn", self.hidden, q_out),
            "k_proj": ("self_attn", self.hidden, kv_out),
            "v_proj": ("self_attn", self.hidden, kv_out),
            "o_proj": ("self_attn", q_out, self.hidden),
            "gate_proj": ("mlp", self.hidden, self.intermediate),
            "up_proj": ("mlp", self.hidden, self.intermediate),
            "down_proj": ("mlp", self.intermediate, self.hidden),
        }[target]


TINY_LLAMA = LlamaShape(hidden=128, intermediate=256, layers=2)


def module_path(layer: int, target: str, shape: LlamaShape = TINY_LLAMA) -> str:
    """The PEFT module name of `target` in `layer` (without `.lora_A.weight`)."""
    block = shape.linear(target)[0]
    return f"base_model.model.model.layers.{layer}.{block}.{target}"


def random_lora(
    *,
    seed: int,
    r: int,
    targets: Iterable[str] = ("q_proj", "v_proj"),
    layers: Iterable[int] | None = None,
    shape: LlamaShape = TINY_LLAMA,
    alpha: float | None = None,
    base_model: str = BASE,
    scale: float = 0.05,
    a_scale: float | Literal["fan_in"] | None = None,
    dtype: torch.dtype = torch.float32,
) -> LoraAdapter:
    """A LoRA with random, non-zero A and B for `targets` in `layers` (default: all of them).

    B ~ N(0, scale^2); A ~ N(0, a_scale^2), with `a_scale=None` meaning `scale` and "fan_in"
    meaning 1/sqrt(in_features). `alpha` defaults to 2r."""
    gen = torch.Generator().manual_seed(seed)
    targets = tuple(targets)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(shape.layers) if layers is None else layers:
        for target in targets:
            _, fan_in, fan_out = shape.linear(target)
            std_a = fan_in**-0.5 if a_scale == "fan_in" else (scale if a_scale is None else a_scale)
            path = module_path(layer, target, shape)
            a = torch.randn(r, fan_in, generator=gen, dtype=torch.float64) * std_a
            b = torch.randn(fan_out, r, generator=gen, dtype=torch.float64) * scale
            tensors[f"{path}.lora_A.weight"] = a.to(dtype)
            tensors[f"{path}.lora_B.weight"] = b.to(dtype)
    return LoraAdapter(
        r=r,
        alpha=float(2 * r) if alpha is None else alpha,
        target_modules=targets,
        base_model=base_model,
        tensors=tensors,
    )


def strong_lora(
    model_dir: Path,
    base_model: str,
    seed: int,
    *,
    r: int = 8,
    targets: Iterable[str] = ALL_TARGETS,
    scale: float = 0.5,
) -> LoraAdapter:
    """A LoRA on `targets` of every layer of the saved model at `model_dir`, strong enough to
    move its greedy answers away from the base model's and from other seeds'."""
    return random_lora(
        seed=seed,
        r=r,
        targets=tuple(sorted(targets)),
        shape=LlamaShape.of(model_dir),
        base_model=base_model,
        scale=scale,
        a_scale="fan_in",
    )
