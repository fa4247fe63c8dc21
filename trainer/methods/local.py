"""Local-only baseline: every user trains their own LoRA alone; nothing is shared.

The upload is empty and the global parameters are empty; the user's LoRA lives in the client
state and starts, in the first round, from the same seeded initialization FedAvg would use.
The client publishes it to its private `users/<u>/personal` slot and the user is served it
alone. This is the lower bound on communication and the "no collaboration" reference for the
personalized methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from fedpersona.trainer.errors import MethodError
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
)

if TYPE_CHECKING:
    from fedpersona.adapters import LoraAdapter
    from fedpersona.trainer.models.basemodel import ModelInfo

OWN = "own"


@dataclass(frozen=True)
class LocalOnly(LoraMethod):
    """Each user's own LoRA, trained only on their data."""

    spec: LoraSpec = DEFAULT_SPEC
    max_rank: int = DEFAULT_MAX_RANK
    name: str = "local"
    KEPT: ClassVar[str | None] = OWN
    behaviour: ClassVar[Behaviour] = Behaviour(
        shares=Shares.NOTHING,
        publishes=frozenset({Product.SERVED, Product.PERSONAL}),
        base_role=BaseRole.LARGE,
    )

    def __post_init__(self) -> None:
        if self.spec.rank > self.max_rank:
            raise MethodError(f"rank {self.spec.rank} exceeds the served maximum {self.max_rank}")

    def loras(self) -> dict[str, LoraSpec]:
        return {OWN: self.spec}

    def init_global(self, *, base_model: ModelInfo, seed: int) -> Params:
        return {}

    def finish(self, local: LocalRound) -> LocalResult:
        own = local.session.read(OWN)
        return LocalResult(
            upload={}, state=own, served=self.adapter(own, self.spec, local.base_model)
        )

    def aggregate(self, *, previous: Params, results: list[tuple[Params, int]]) -> Params:
        for i, (upload, _) in enumerate(results):
            if upload:
                raise MethodError(f"local-only result {i} uploaded parameters; it must send none")
        return dict(previous)

    def served_adapter(
        self, *, base_model: ModelInfo, global_params: Params, state: Params
    ) -> LoraAdapter:
        if not state:
            raise MethodError("local-only: this user has not trained yet; nothing to serve")
        return self.adapter(state, self.spec, base_model)

    def personal_adapter(self, *, base_model: ModelInfo, state: Params) -> LoraAdapter | None:
        """The user's own LoRA: personal and served are the same adapter."""
        return self.served_adapter(base_model=base_model, global_params={}, state=state)
