"""Per-row LoRA on the unmerged small model: one forward pass serves the base and many experts.

An expert is the small base model plus a LoRA. Rather than merging each LoRA into its own copy
of the small model (200 MB per expert for the 6-layer SmolLM2 proxy) and running the base and
every expert as separate forward passes, the base weights are shared: `ExpertWeights` holds
only an expert's factors (`A` [r, in] and `scaling * B` [out, r] per adapted linear layer), and
`routed(model, rows)` makes each adapted layer add `(x @ A^T) @ (scaling * B)^T` to the batch
rows that belong to that expert (rows routed to `None` run the plain base). The base rows and
the expert rows of every request thus advance in one batched forward pass over one set of
weights. `(W + s B A) x` and `W x + s B (A x)` are equal up to float rounding (~1e-6 relative).

Knows torch modules and `LoraAdapter`s; nothing about the store, vLLM or requests.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from fedpersona.adapters.lora import LoraAdapter
from fedpersona.service.proxy_tuning.errors import ExpertUnavailable

_PEFT_PREFIX = "base_model.model."

# Per module name: (A [r, in], scaling * B [out, r]).
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True, eq=False)
class ExpertWeights:
    """The LoRA factors of one expert, checked against the small model and ready to route."""

    factors: Factors

    def nbytes(self) -> int:
        return sum(
            a.numel() * a.element_size() + b.numel() * b.element_size()
            for a, b in self.factors.values()
        )


def expert_weights(base: torch.nn.Module, adapter: LoraAdapter, *, where: str) -> ExpertWeights:
    """`adapter`'s factors for `base`, in its dtype and device; refused unless every adapted
    module is a linear layer of `base` with the LoRA's shape."""
    factors: Factors = {}
    for key, (a, b) in adapter.modules().items():
        name = key.removeprefix(_PEFT_PREFIX)
        try:
            module = base.get_submodule(name)
        except AttributeError as e:
            raise ExpertUnavailable(
                f"expert {where}: module {key!r} does not exist in the small model"
            ) from e
        weight = getattr(module, "weight", None)
        shape = (b.shape[0], a.shape[1])
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != shape:
            have = None if not isinstance(weight, torch.Tensor) else tuple(weight.shape)
            raise ExpertUnavailable(
                f"expert {where}: module {key!r} has weight shape {have}, the LoRA's "
                f"update is {shape}: trained for another model"
            )
        if not isinstance(module, torch.nn.Linear):
            raise ExpertUnavailable(
                f"expert {where}: module {key!r} is a {type(module).__name__}, not a linear "
                "layer (only linear layers can be adapted per row)"
            )
        device, dtype = weight.device, weight.dtype
        factors[name] = (
            a.to(device=device, dtype=dtype).contiguous(),
            (adapter.scaling * b.to(torch.float32)).to(device=device, dtype=dtype).contiguous(),
        )
    return ExpertWeights(factors)


def _groups(
    rows: Sequence[ExpertWeights | None],
) -> list[tuple[ExpertWeights, slice | torch.Tensor]]:
    """Each expert with its rows: a slice when they are contiguous (the usual case), else an
    index tensor."""
    members: dict[int, tuple[ExpertWeights, list[int]]] = {}
    for row, expert in enumerate(rows):
        if expert is not None:
            members.setdefault(id(expert), (expert, []))[1].append(row)
    groups: list[tuple[ExpertWeights, slice | torch.Tensor]] = []
    for expert, idx in members.values():
        if idx[-1] - idx[0] + 1 == len(idx):
            groups.append((expert, slice(idx[0], idx[-1] + 1)))
        else:
            groups.append((expert, torch.tensor(idx, dtype=torch.long)))
    return groups


@contextmanager
def routed(model: torch.nn.Module, rows: Sequence[ExpertWeights | None]) -> Iterator[None]:
    """While active, forward passes of `model` add row `i`'s expert LoRA (none for `None`)."""
    groups = _groups(rows)
    by_module: dict[str, list[tuple[slice | torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
    for expert, where in groups:
        for name, (a, b) in expert.factors.items():
            by_module.setdefault(name, []).append((where, a, b))
    handles = []
    try:
        for name, parts in by_module.items():
            handles.append(model.get_submodule(name).register_forward_hook(_hook(parts)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _hook(parts: list[tuple[slice | torch.Tensor, torch.Tensor, torch.Tensor]]):  # type: ignore[no-untyped-def]
    def hook(
        module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> torch.Tensor:
        x = inputs[0]
        for where, a, b in parts:
            if isinstance(where, slice):
                output[where] += (x[where] @ a.T) @ b.T
            else:
                index = where.to(x.device)
                output.index_add_(0, index, (x.index_select(0, index) @ a.T) @ b.T)
        return output

    return hook
