"""Builders shared by the adapter tests: random LoRAs (`support.lora`), a tiny Llama.

Imported by module name (`from factories_adapters import ...`); a uniquely named module rather
than a conftest, so imports stay unambiguous next to the other packages' test directories.

The tiny Llama is built here in memory (hidden 128, 2 heads of 64, 2 layers) rather than taken
from the session `micro_models` fixture: these tests only need PEFT to wrap real `nn.Linear`
layers, and building it in memory keeps `tests/adapters` independent of the trainer.
"""

from __future__ import annotations

from typing import Any

import torch
from fedpersona.adapters import LoraAdapter
from support.lora import ALL_TARGETS, BASE, TINY_LLAMA, module_path, random_lora

__all__ = [
    "BASE",
    "HIDDEN",
    "INTERMEDIATE",
    "LAYERS",
    "TARGETS",
    "logits",
    "make_adapter",
    "module_path",
    "random_tokens",
    "tiny_llama",
    "with_deltas",
]

HIDDEN, INTERMEDIATE, LAYERS = TINY_LLAMA.hidden, TINY_LLAMA.intermediate, TINY_LLAMA.layers
TARGETS = ALL_TARGETS
# The suite's one LoRA builder: random A and B for `targets` in `layers` of the tiny Llama.
make_adapter = random_lora


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
