"""Builders shared by the adapter tests: random LoRAs with real PEFT key names, a tiny Llama.

Imported by module name (`from factories_adapters import ...`); a uniquely named module rather
than a conftest, so imports stay unambiguous next to the other packages' test directories.

The tiny Llama is built here in memory (hidden 128, 2 heads of 64, 2 layers) rather than taken
from the session `micro_models` fixture: these tests only need PEFT to wrap real `nn.Linear`
layers, and building it in memory keeps `tests/adapters` independent of the trainer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from fedpersona.adapters import LoraAdapter

BASE = "fedpersona-test-base"
HIDDEN, INTERMEDIATE, LAYERS = 128, 256, 2

# (PEFT module path inside a LlamaForCausalLM, in_features, out_features) per target name.
_MODULES = {
    "q_proj": ("self_attn", HIDDEN, HIDDEN),
    "k_proj": ("self_attn", HIDDEN, HIDDEN),
    "v_proj": ("self_attn", HIDDEN, HIDDEN),
    "o_proj": ("self_attn", HIDDEN, HIDDEN),
    "gate_proj": ("mlp", HIDDEN, INTERMEDIATE),
    "up_proj": ("mlp", HIDDEN, INTERMEDIATE),
    "down_proj": ("mlp", INTERMEDIATE, HIDDEN),
}
TARGETS = tuple(_MODULES)


def module_path(layer: int, target: str) -> str:
    block = _MODULES[target][0]
    return f"base_model.model.model.layers.{layer}.{block}.{target}"


def make_adapter(
    *,
    seed: int,
    r: int,
    targets: Iterable[str] = ("q_proj", "v_proj"),
    layers: Iterable[int] = range(LAYERS),
    alpha: float | None = None,
    base_model: str = BASE,
    scale: float = 0.05,
    dtype: torch.dtype = torch.float32,
) -> LoraAdapter:
    """A LoRA with random (non-zero) A and B for `targets` in `layers` of the tiny Llama."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    targets = tuple(targets)
    for layer in layers:
        for target in targets:
            _, fan_in, fan_out = _MODULES[target]
            path = module_path(layer, target)
            a = torch.randn(r, fan_in, generator=gen, dtype=torch.float64) * scale
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


def tiny_llama(seed: int = 0) -> Any:
    """A randomly initialised 2-layer Llama (head_dim 64) in eval mode, float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=96,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def with_deltas(model: torch.nn.Module, *adapters: LoraAdapter) -> torch.nn.Module:
    """A deep copy of `model` with each adapter's `alpha/r * B @ A` added to its Linear weights."""
    import copy

    merged = copy.deepcopy(model)
    for adapter in adapters:
        for module in adapter.modules():
            linear = merged.get_submodule(module.removeprefix("base_model.model."))
            assert isinstance(linear, torch.nn.Linear)
            with torch.no_grad():
                linear.weight += adapter.delta(module)
    return merged


def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


def random_tokens(seed: int, *, batch: int = 2, length: int = 12) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 96, (batch, length), generator=gen)
