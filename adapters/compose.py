"""Exact composition of two LoRAs into one servable LoRA (PFTT: global + personal).

vLLM applies one adapter per request, so a user's global and personal LoRAs are served as one.
For every module the two updates add up, and their sum is itself a LoRA:

    dW = s_g B_g A_g + s_p B_p A_p = [s_g B_g | s_p B_p] @ [A_g ; A_p]

with rank r_g + r_p and the scalings s = alpha / r folded into B, so the result has
`lora_alpha = r` (scaling 1). A module only one side targets gets zero rows in A (and zero
columns in B) for the other side, keeping one rank for the whole adapter as vLLM requires.
The result is exact up to float rounding of the folded scalings. Pure tensor code: no I/O.
"""

from __future__ import annotations

import torch
from fedpersona.adapters.errors import InvalidAdapter
from fedpersona.adapters.lora import LoraAdapter, lora_keys


def compose(global_lora: LoraAdapter, personal_lora: LoraAdapter) -> LoraAdapter:
    """One LoRA whose update equals the sum of the two adapters' updates, module by module.

    Both must be for the same base model, and a module both target must have the same input
    and output sizes in both. The composed adapter's rank is `r_g + r_p`, its alpha equals its
    rank, and its tensors take the common dtype of the inputs.
    """
    if global_lora.base_model != personal_lora.base_model:
        raise InvalidAdapter(
            f"cannot compose adapters of different base models: "
            f"{global_lora.base_model!r} and {personal_lora.base_model!r}"
        )
    g_modules, p_modules = global_lora.modules(), personal_lora.modules()
    r_g, r_p = global_lora.r, personal_lora.r
    dtype = torch.promote_types(_dtype(global_lora), _dtype(personal_lora))
    tensors: dict[str, torch.Tensor] = {}
    for module in sorted(set(g_modules) | set(p_modules)):
        in_features, out_features = _dims(module, g_modules.get(module), p_modules.get(module))
        a_parts, b_parts = [], []
        for side, rank, scaling in (
            (g_modules.get(module), r_g, global_lora.scaling),
            (p_modules.get(module), r_p, personal_lora.scaling),
        ):
            if side is None:
                a_parts.append(torch.zeros(rank, in_features, dtype=dtype))
                b_parts.append(torch.zeros(out_features, rank, dtype=dtype))
            else:
                a, b = side
                a_parts.append(a.detach().to("cpu", dtype))
                b_parts.append(b.detach().to("cpu", dtype) * scaling)
        a_key, b_key = lora_keys(module)
        tensors[a_key] = torch.cat(a_parts, dim=0)
        tensors[b_key] = torch.cat(b_parts, dim=1)
    rank = r_g + r_p
    return LoraAdapter(
        r=rank,
        alpha=rank,
        target_modules=tuple(set(global_lora.target_modules) | set(personal_lora.target_modules)),
        base_model=global_lora.base_model,
        tensors=tensors,
    )


def _dtype(adapter: LoraAdapter) -> torch.dtype:
    dtype = torch.float32
    for tensor in adapter.tensors.values():
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _dims(
    module: str,
    g: tuple[torch.Tensor, torch.Tensor] | None,
    p: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[int, int]:
    sides = [s for s in (g, p) if s is not None]
    shapes = {(a.shape[1], b.shape[0]) for a, b in sides}
    if len(shapes) != 1:
        raise InvalidAdapter(
            f"module {module!r}: the adapters disagree on its (in, out) sizes: {sorted(shapes)}"
        )
    ((in_features, out_features),) = shapes
    return int(in_features), int(out_features)
