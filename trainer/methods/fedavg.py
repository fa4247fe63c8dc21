"""FedAvg (and FedProx): one LoRA shared by everyone, averaged weighted by example count.

Each client starts from the global LoRA, trains it on its own chats and uploads all of it; the
server replaces the global by the example-weighted mean. With a proximal coefficient `mu > 0`
local training adds `mu / 2 * ||w - w_global||^2` (FedProx, Li et al. 2020), which keeps
clients with very different data from drifting far from the global model; the registry's
`fedprox` is this class with `prox_mu = 0.01`. A user is served the global LoRA (after local
training: their locally trained copy). Nothing stays on the client.

`FedAvgFT` (registered as `fedavg-ft`) is FedAvg + local fine-tuning, the standard strong
baseline of personalized FL: rounds 1..R-1 are FedAvg; in the last round every client
fine-tunes the final global LoRA on its own chats for the same `local_steps`, keeps the result
as its personal LoRA (published to its private slot, never uploaded) and is served it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

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
    from fedpersona.trainer.models.basemodel import ModelInfo

SHARED = "shared"


@dataclass(frozen=True)
class FedAvg(LoraMethod):
    """FedAvg over one LoRA; `prox_mu` > 0 makes it FedProx (a `TrainConfig.prox_mu` > 0 wins)."""

    spec: LoraSpec = DEFAULT_SPEC
    prox_mu: float = 0.0
    max_rank: int = DEFAULT_MAX_RANK
    name: str = "fedavg"
    SHARED: ClassVar[str | None] = SHARED

    @property
    def behaviour(self) -> Behaviour:
        # A property, not a class constant: FedPT (a subclass) derives its behaviour from options.
        return Behaviour(
            shares=Shares.LORA,
            publishes=frozenset({Product.GLOBAL, Product.SERVED}),
            base_role=BaseRole.LARGE,
        )

    def __post_init__(self) -> None:
        if self.spec.rank > self.max_rank:
            raise MethodError(f"rank {self.spec.rank} exceeds the served maximum {self.max_rank}")
        if not self.prox_mu >= 0:
            raise MethodError(f"prox_mu must be >= 0, got {self.prox_mu!r}")

    def loras(self) -> dict[str, LoraSpec]:
        return {SHARED: self.spec}

    def init_global(self, *, base_model: ModelInfo, seed: int) -> Params:
        from fedpersona.trainer.learn.lora_train import LoraSession

        return LoraSession(base_model, self.loras(), seed=seed).read(SHARED)

    def finish(self, local: LocalRound) -> LocalResult:
        upload = local.session.read(SHARED)
        return LocalResult(
            upload=upload, state={}, served=self.adapter(upload, self.spec, local.base_model)
        )

    def aggregate(self, *, previous: Params, results: list[tuple[Params, int]]) -> Params:
        if without_uploads(results):
            return dict(previous)
        return weighted_mean(results)

    def served_adapter(
        self, *, base_model: ModelInfo, global_params: Params, state: Params
    ) -> LoraAdapter:
        return self.adapter(global_params, self.spec, base_model)


@dataclass(frozen=True)
class FedAvgFT(FedAvg):
    """FedAvg, then the final global fine-tuned locally by every user (its last round)."""

    name: str = "fedavg-ft"
    personal_round: bool = True

    @property
    def behaviour(self) -> Behaviour:
        return Behaviour(
            shares=Shares.LORA,
            publishes=frozenset({Product.GLOBAL, Product.SERVED, Product.PERSONAL}),
            base_role=BaseRole.LARGE,
        )

    def finish(self, local: LocalRound) -> LocalResult:
        if not local.final:
            return super().finish(local)
        tuned = local.session.read(SHARED)
        return LocalResult(
            upload={}, state=tuned, served=self.adapter(tuned, self.spec, local.base_model)
        )

    def served_adapter(
        self, *, base_model: ModelInfo, global_params: Params, state: Params
    ) -> LoraAdapter:
        return self.adapter(state or global_params, self.spec, base_model)

    def personal_adapter(self, *, base_model: ModelInfo, state: Params) -> LoraAdapter | None:
        return self.adapter(state, self.spec, base_model) if state else None
