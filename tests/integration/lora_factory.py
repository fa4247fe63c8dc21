"""Random-but-strong LoRA adapters for the integration tests (no training needed).

A ~ N(0, 1/fan_in) and B ~ N(0, b_scale^2): large enough to move greedy answers visibly away
from the base model's and from other seeds'. Shapes come from the model's config.json, so the
same factory serves the large and the small micro model. A plain module (not conftest.py): the
test directories each have a conftest.py, so `from conftest import` is ambiguous.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from fedpersona.adapters import LoraAdapter

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def random_lora(
    model_dir: Path,
    base_model: str,
    seed: int,
    *,
    r: int = 8,
    targets: tuple[str, ...] = ALL_TARGETS,
    b_scale: float = 0.5,
) -> LoraAdapter:
    config = json.loads((model_dir / "config.json").read_text())
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    q_out = config["num_attention_heads"] * config["head_dim"]
    kv_out = config["num_key_value_heads"] * config["head_dim"]
    shapes = {
        "q_proj": ("self_attn", hidden, q_out),
        "k_proj": ("self_attn", hidden, kv_out),
        "v_proj": ("self_attn", hidden, kv_out),
        "o_proj": ("self_attn", q_out, hidden),
        "gate_proj": ("mlp", hidden, inter),
        "up_proj": ("mlp", hidden, inter),
        "down_proj": ("mlp", inter, hidden),
    }
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for target in targets:
            block, fan_in, fan_out = shapes[target]
            key = f"base_model.model.model.layers.{layer}.{block}.{target}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, fan_in, generator=gen) / fan_in**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, r, generator=gen) * b_scale
    return LoraAdapter(
        r=r,
        alpha=float(2 * r),
        target_modules=tuple(sorted(targets)),
        base_model=base_model,
        tensors=tensors,
    )
