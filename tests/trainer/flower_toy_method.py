"""A numpy stand-in for a PFTT-like `Method`, for fast tests of the Flower plumbing.

Global: one LoRA on `q_proj` (averaged). Personal: one LoRA on `v_proj` per user (kept in the
client state, never uploaded). Training is "add a user-specific constant", so every aggregate
and every served adapter can be computed by hand in a test.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from fedpersona.adapters import LoraAdapter, compose
from fedpersona.trainer.methods.base import (
    BaseRole,
    Behaviour,
    ClientUpdate,
    Params,
    Product,
    Shares,
    TrainConfig,
)
from fedpersona.trainer.models.basemodel import ModelInfo

GLOBAL_MODULE = "base_model.model.model.layers.0.self_attn.q_proj"
PERSONAL_MODULE = "base_model.model.model.layers.0.self_attn.v_proj"
RANK = 2
DIM = 8


def keys(module: str) -> tuple[str, str]:
    return f"{module}.lora_A.weight", f"{module}.lora_B.weight"


def personal_state(value: float) -> Params:
    """A personal LoRA state of the toy whose every entry is `value`."""
    a, b = keys(PERSONAL_MODULE)
    return {a: np.full((RANK, DIM), value, np.float32), b: np.full((DIM, RANK), value, np.float32)}


def user_value(silo: Path) -> float:
    """A constant per user, derived from the silo's example count."""
    return float(len((silo / "train.jsonl").read_text().splitlines()))


# Declared like PFTT: a global part averaged, a personal part published by the client, a served
# composition per user on the large model.
TOY_BEHAVIOUR = Behaviour(
    shares=Shares.GLOBAL_LORA,
    publishes=frozenset({Product.GLOBAL, Product.SERVED, Product.PERSONAL}),
    base_role=BaseRole.LARGE,
)


@dataclass
class ToyMethod:
    name: str = "pftt"
    aggregations: int = 0  # rounds aggregated by this (server-side) instance
    behaviour: ClassVar[Behaviour] = TOY_BEHAVIOUR

    def init_global(self, *, base_model: ModelInfo, seed: int) -> Params:
        a, b = keys(GLOBAL_MODULE)
        return {a: np.full((RANK, DIM), 0.5, np.float32), b: np.zeros((DIM, RANK), np.float32)}

    def client_update(
        self,
        *,
        base_model: ModelInfo,
        silo: Path,
        global_params: Params,
        state: Params,
        config: TrainConfig,
        round_idx: int,
    ) -> ClientUpdate:
        value = user_value(silo)
        upload = {k: v + np.float32(value) for k, v in global_params.items()}
        pa, pb = keys(PERSONAL_MODULE)
        previous = state.get(pb, np.zeros((DIM, RANK), np.float32))
        new_state = {pa: np.full((RANK, DIM), 1.0, np.float32), pb: previous + np.float32(value)}
        served = self.served_adapter(base_model=base_model, global_params=upload, state=new_state)
        return ClientUpdate(
            upload=upload,
            num_examples=int(value),
            metrics={"train_loss": 1.0 / round_idx + value},
            state=new_state,
            served=served,
        )

    def aggregate(self, *, previous: Params, results: list[tuple[Params, int]]) -> Params:
        self.aggregations += 1
        total = sum(n for _, n in results)
        return {
            k: np.sum([p[k] * (n / total) for p, n in results], axis=0).astype(np.float32)
            for k in previous
        }

    def served_adapter(
        self, *, base_model: ModelInfo, global_params: Params, state: Params
    ) -> LoraAdapter:
        personal = {k: v for k, v in state.items() if PERSONAL_MODULE in k}
        glob = _adapter(global_params, base_model.name)
        if not personal:
            return glob
        return compose(glob, _adapter(personal, base_model.name))

    def personal_adapter(self, *, base_model: ModelInfo, state: Params) -> LoraAdapter:
        return _adapter(state, base_model.name)


def _adapter(params: Params, base: str) -> LoraAdapter:
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in params.items() if ".lora_" in k}
    targets = tuple(sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in tensors}))
    return LoraAdapter(
        r=RANK, alpha=float(RANK), target_modules=targets, base_model=base, tensors=tensors
    )


@dataclass
class CrashingToyMethod(ToyMethod):
    """Raises while composing the second user's served adapter in round `crash_round`.

    The server's instance counts rounds by its `aggregate` calls; clients never crash.
    """

    crash_round: int = 2
    served_this_round: int = 0

    def aggregate(self, *, previous: Params, results: list[tuple[Params, int]]) -> Params:
        self.served_this_round = 0
        return super().aggregate(previous=previous, results=results)

    def served_adapter(
        self, *, base_model: ModelInfo, global_params: Params, state: Params
    ) -> LoraAdapter:
        if state:
            self.served_this_round += 1
            if self.aggregations == self.crash_round and self.served_this_round == 2:
                raise RuntimeError("boom: the server died while composing a served adapter")
        return super().served_adapter(
            base_model=base_model, global_params=global_params, state=state
        )
