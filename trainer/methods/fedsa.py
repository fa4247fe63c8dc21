"""FedSA-LoRA (Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated
Learning", ICLR 2025): share the A matrices, keep the B matrices personal.

Every client trains one LoRA of the budget's rank. Its A matrices (`<module>.lora_A.weight`,
shape [r, in]) learn what the paper finds to be general knowledge and are averaged across
clients (weighted by examples); its B matrices (`lora_B`, [out, r]) capture the client-specific
part and never leave the client. A round starts from the global A and the user's own B (a first
round from the seeded initialization, B = 0). The uplink is therefore only the A half of the
LoRA. The user is served the global A with their own B: one plain LoRA of the budget's rank.

The client keeps its whole locally trained LoRA as its personal LoRA (published to its private
`users/<u>/personal` slot; the server uses only its B). With `personal_round` (default on, as in
`docs/evaluation.md`) the last round trains only B against the final global A, which is frozen
and not uploaded again, so what a user is served is exactly what they trained.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from fedpersona.trainer.errors import MethodError
from fedpersona.trainer.methods.aggregation import weighted_mean
from fedpersona.trainer.methods.base import (
    DEFAULT_MAX_RANK,
    DEFAULT_SPEC,
    BaseRole,
    Behaviour,
    LocalResult,
    LocalRound,
    LoraMethod,
    LoraSpec,
    Params,
    Product,
    Shares,
    without_uploads,
)

if TYPE_CHECKING:
    from fedpersona.adapters import LoraAdapter
    from fedpersona.trainer.learn.lora_train import LoraSession
    from fedpersona.trainer.models.basemodel import ModelInfo

LORA = "own"  # not "lora": PEFT reserves its "lora_" prefix
A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"


def is_a(key: str) -> bool:
    return key.endswith(A_SUFFIX)


def is_b(key: str) -> bool:
    return key.endswith(B_SUFFIX)


@dataclass(frozen=True)
class FedSA(LoraMethod):
    """One LoRA per client: A averaged across clients, B kept by each client."""

    spec: LoraSpec = DEFAULT_SPEC
    prox_mu: float = 0.0
    personal_round: bool = True
    max_rank: int = DEFAULT_MAX_RANK
    name: str = "fedsa"
    behaviour: ClassVar[Behaviour] = Behaviour(
        shares=Shares.LORA_A,
        publishes=frozenset({Product.GLOBAL, Product.SERVED, Product.PERSONAL}),
        base_role=BaseRole.LARGE,
    )

    def __post_init__(self) -> None:
        if self.spec.rank > self.max_rank:
            raise MethodError(f"rank {self.spec.rank} exceeds the served maximum {self.max_rank}")
        if self.prox_mu != 0:
            raise MethodError("fedsa: a FedProx term is not defined for it (prox_mu must be 0)")

    def loras(self) -> dict[str, LoraSpec]:
        return {LORA: self.spec}

    def init_global(self, *, base_model: ModelInfo, seed: int) -> Params:
        from fedpersona.trainer.learn.lora_train import LoraSession

        full = LoraSession(base_model, self.loras(), seed=seed).read(LORA)
        return {k: v for k, v in full.items() if is_a(k)}

    def prepare(
        self, session: LoraSession, *, global_params: Params, state: Params, final: bool
    ) -> None:
        start = session.read(LORA)  # the seeded initialization: B = 0
        start.update(self._check_a(global_params, like=start))
        start.update({k: v for k, v in state.items() if is_b(k)})
        session.write(LORA, start)

    def trainable(self, *, final: bool) -> dict[str, Callable[[str], bool] | None]:
        return {LORA: is_b if final else None}

    def finish(self, local: LocalRound) -> LocalResult:
        trained = local.session.read(LORA)
        upload = {} if local.final else {k: v for k, v in trained.items() if is_a(k)}
        return LocalResult(
            upload=upload,
            state=trained,
            served=self.adapter(trained, self.spec, local.base_model),
        )

    def aggregate(self, *, previous: Params, results: list[tuple[Params, int]]) -> Params:
        if without_uploads(results):
            return dict(previous)
        return weighted_mean(results)

    def served_adapter(
        self, *, base_model: ModelInfo, global_params: Params, state: Params
    ) -> LoraAdapter:
        """The global A with the user's B; without a B (a user who never trained, the global
        slot) B = 0, so the adapter is the base model: FedSA shares no output side."""
        params = dict(global_params)
        zeros: Params | None = None
        for key in global_params:
            b_key = key[: -len(A_SUFFIX)] + B_SUFFIX
            if b_key in state:
                params[b_key] = np.asarray(state[b_key], np.float32)
            else:
                zeros = zeros or self._zero_b(base_model)
                params[b_key] = zeros[b_key]
        return self.adapter(params, self.spec, base_model)

    def personal_adapter(self, *, base_model: ModelInfo, state: Params) -> LoraAdapter | None:
        """The client's whole locally trained LoRA (the server serves only its B)."""
        return self.adapter(state, self.spec, base_model) if state else None

    def _zero_b(self, base_model: ModelInfo) -> Params:
        return {k: np.zeros(shape, np.float32) for k, shape in _b_shapes(self, base_model).items()}

    @staticmethod
    def _check_a(global_params: Params, *, like: Params) -> Params:
        expected = {k for k in like if is_a(k)}
        if set(global_params) != expected:
            raise MethodError("fedsa: the global params are not this LoRA's A matrices")
        return dict(global_params)


@functools.lru_cache(maxsize=4)
def _b_shapes(method: FedSA, base_model: ModelInfo) -> dict[str, tuple[int, ...]]:
    """The B shapes of `method`'s LoRA on `base_model` (their output sizes are the model's)."""
    from fedpersona.trainer.learn.lora_train import LoraSession

    full = LoraSession(base_model, method.loras(), seed=0).read(LORA)
    return {k: tuple(v.shape) for k, v in full.items() if is_b(k)}
