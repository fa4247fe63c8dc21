"""The contract every federated method implements, and the value types it exchanges.

A method splits one federated round into pure pieces that a driver (the Flower apps, a test, a
benchmark) calls in order:

    global = method.init_global(...)                                     # server, once
    update = method.client_update(global_params=global, state=s_u, ...)  # client u, each round
    global = method.aggregate(previous=global, results=[(upload, n)...]) # server, each round
    adapter = method.served_adapter(global_params=global, state=s_u')    # what user u is served

`ClientUpdate.upload` is exactly what leaves the client; `ClientUpdate.state` never does (the
driver keeps it on the client, e.g. in Flower's `context.state`). This module holds no training
code and imports no torch model code.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from fedpersona.adapters import LoraAdapter
from fedpersona.trainer.errors import MethodError
from fedpersona.trainer.models.basemodel import ModelInfo

# PEFT key names ("<module>.lora_A.weight" / ".lora_B.weight") -> float32 arrays. PerFIT uploads
# additionally carry "<key>.mask" bit-packed uint8 arrays (see trainer/methods/perfit.py).
Params = dict[str, np.ndarray]

DEFAULT_TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class LoraSpec:
    """Shape of one LoRA: its rank, alpha (update = alpha / rank * B @ A) and target modules."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise MethodError(f"LoraSpec.rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise MethodError(f"LoraSpec.alpha must be positive, got {self.alpha!r}")
        if not self.target_modules or not all(
            isinstance(t, str) and t for t in self.target_modules
        ):
            raise MethodError(
                "LoraSpec.target_modules must be non-empty module names, "
                f"got {self.target_modules!r}"
            )
        object.__setattr__(self, "target_modules", tuple(self.target_modules))


# FedAvg's LoRA. alpha = 2 * rank everywhere, so every method's LoRA has the same scaling.
DEFAULT_SPEC = LoraSpec(rank=8, alpha=16.0)
# The largest rank a served adapter may have (vLLM --max-lora-rank of the default deployment).
DEFAULT_MAX_RANK = 16


@dataclass(frozen=True)
class TrainConfig:
    """Local training of one client in one round."""

    steps: int
    lr: float
    batch_size: int
    max_len: int
    seed: int
    prox_mu: float = 0.0  # FedProx: adds prox_mu / 2 * ||w - w_global||^2 on the shared LoRA

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MethodError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise MethodError(f"TrainConfig.lr must be positive, got {self.lr!r}")
        if not self.prox_mu >= 0:
            raise MethodError(f"TrainConfig.prox_mu must be >= 0, got {self.prox_mu!r}")


@dataclass
class ClientUpdate:
    """The result of one client's local round."""

    upload: Params  # exactly what goes to the server (may be empty)
    num_examples: int  # training chats used; the aggregation weight
    metrics: dict[str, float]  # train_loss, train_loss_first, train_loss_last, ...
    state: Params  # what the client keeps across rounds (personal LoRA, masks); never uploaded
    served: LoraAdapter  # this user's servable adapter after this round's local training


class Method(Protocol):
    """One federated method (FedAvg, local-only, PFTT, PerFIT)."""

    name: str

    def init_global(self, *, base_model: ModelInfo, seed: int) -> Params: ...

    def client_update(
        self,
        *,
        base_model: ModelInfo,
        silo: Path,
        global_params: Params,
        state: Params,
        config: TrainConfig,
        round_idx: int,
    ) -> ClientUpdate: ...

    def aggregate(self, *, previous: Params, results: list[tuple[Params, int]]) -> Params: ...

    def served_adapter(
        self, *, base_model: ModelInfo, global_params: Params, state: Params
    ) -> LoraAdapter: ...


def order_seed(config: TrainConfig, *, round_idx: int, silo: Path) -> tuple[int, ...]:
    """Seed words for one client's batch order: run seed, round and a stable hash of the silo.

    Different users and rounds see different orders; the same inputs always the same order.
    """
    digest = hashlib.sha256(Path(silo).name.encode("utf-8")).digest()
    return (config.seed, round_idx, int.from_bytes(digest[:8], "big"))
