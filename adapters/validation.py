"""Deployment checks for adapters: what vLLM, started with our flags, would reject or mis-serve.

`lora.py` already guarantees a well-formed plain LoRA (no DoRA, bias, modules_to_save, ...);
this module adds the checks that depend on the deployment: the server's maximum rank, the base
model the adapter must have been trained on, and finite weights (vLLM would happily serve NaNs).
`validate_adapter` is pure; `validate_adapter_dir` reads a PEFT directory first.
"""

from __future__ import annotations

from pathlib import Path

import torch
from fedpersona.adapters.errors import InvalidAdapter
from fedpersona.adapters.lora import CONFIG_FILE, WEIGHTS_FILE, LoraAdapter, load_lora


def validate_adapter(
    adapter: LoraAdapter, *, max_rank: int, base_model: str | None, where: str = "adapter"
) -> LoraAdapter:
    """Return `adapter` if it can be served under `max_rank` on `base_model`, else raise.

    `base_model=None` skips the base model check. `where` (a directory, or "adapter")
    prefixes error messages.
    """
    if adapter.r > max_rank:
        raise InvalidAdapter(
            f"{where}: {CONFIG_FILE} field 'r'={adapter.r} is above the configured maximum "
            f"rank {max_rank} (vLLM --max-lora-rank)"
        )
    if base_model is not None and adapter.base_model != base_model:
        raise InvalidAdapter(
            f"{where}: {CONFIG_FILE} field 'base_model_name_or_path'={adapter.base_model!r} "
            f"does not match the expected base model {base_model!r}"
        )
    for key, tensor in sorted(adapter.tensors.items()):
        if not bool(torch.isfinite(tensor).all()):
            raise InvalidAdapter(
                f"{where}: {WEIGHTS_FILE} tensor {key!r} contains NaN or Inf values"
            )
    return adapter


def validate_adapter_dir(path: str | Path, *, max_rank: int, base_model: str | None) -> LoraAdapter:
    """Load and check the PEFT directory `path`; return the adapter or raise `InvalidAdapter`.

    Raises for: a missing directory, adapter_config.json or adapter_model.safetensors;
    unparsable JSON or safetensors; tensor shapes that disagree with `r` or with each other;
    NaN/Inf weights; peft_type other than LORA; DoRA, bias, modules_to_save, rank/alpha
    patterns; rank above `max_rank`; a base model other than `base_model`; LoRA weights for a
    module type not listed in target_modules. Every message names the file and the field.
    """
    root = Path(path)
    adapter = load_lora(root)
    return validate_adapter(
        adapter,
        max_rank=max_rank,
        base_model=base_model,
        where=str(root),
    )
