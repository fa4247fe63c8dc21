"""PFTT (personalized federated task tuning, arXiv 2404.13238): a shared LoRA plus a personal one.

Every client attaches two LoRAs to the same base model, both active, trained jointly on its
chats: a *global* LoRA that is aggregated with FedAvg (weighted by examples), and a *personal*
LoRA that is never aggregated and never uploaded. The personal LoRA stays in the client state
(the driver may also publish it to that user's private `users/<u>/personal` slot). The user is
served the exact composition `fedpersona.adapters.compose(global, personal)`, one LoRA of rank
`r_g + r_p` whose update equals the sum the model was trained with.

Communication (the design's choice): given the rank budget `spec` that FedAvg would use (default
rank 8), the global LoRA gets half of it on the same target modules (rank 4, same scaling
alpha / rank), so each round's uplink is half of FedAvg's (for odd ranks a little less); the
personal LoRA gets the rest, so the served composition has FedAvg's rank (8).
A FedProx term (`prox_mu`), if set, applies to the global LoRA only. The upload is shipped in
`wire_dtype` (default bfloat16: 2 bytes a value; the server widens it back and aggregates in
float32), so a round's uplink is about a quarter of FedAvg's float32 one, and half of a FedAvg
that shipped bfloat16 too.

With `personal_round` (the evaluation's setting, `docs/evaluation.md`) the last round of a run
trains only the personal LoRA, for the same local steps, against the final global, which stays
frozen and is not uploaded again: the user is then served the final global composed with a
personal LoRA trained on top of exactly that global. Without it, the served adapter after the
last round is the final global composed with the personal LoRA trained jointly with the global
the client received in that round.
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

GLOBAL = "global"
PERSONAL = "personal"
# The dtypes an upload may be shipped in (`fedpersona.trainer.flower.packing.WIRE_DTYPES`).
WIRE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Pftt(LoraMethod):
    """Global LoRA (FedAvg) + personal LoRA (client only), served composed.

    `spec` is the rank budget of the comparison (FedAvg's LoRA, default rank 8): the global LoRA
    gets `spec.rank // 2` of it and the personal LoRA the rest (override with `global_rank` /
    `personal_rank`), both on `spec`'s target modules with its scaling `alpha / rank`.
    """

    spec: LoraSpec = DEFAULT_SPEC
    global_rank: int | None = None
    personal_rank: int | None = None
    prox_mu: float = 0.0
    personal_round: bool = False
    max_rank: int = DEFAULT_MAX_RANK
    wire_dtype: str = "bfloat16"
    name: str = "pftt"
    SHARED: ClassVar[str | None] = GLOBAL
    KEPT: ClassVar[str | None] = PERSONAL
    behaviour: ClassVar[Behaviour] = Behaviour(
        shares=Shares.GLOBAL_LORA,
        publishes=frozenset({Product.GLOBAL, Product.SERVED, Product.PERSONAL}),
        base_role=BaseRole.LARGE,
    )

    def __post_init__(self) -> None:
        for field, value in (
            ("global_rank", self.global_rank),
            ("personal_rank", self.personal_rank),
        ):
            if value is not None and (isinstance(value, bool) or value < 1):
                raise MethodError(f"pftt: {field} must be a positive integer, got {value!r}")
        served_rank = self.global_spec.rank + self.personal_spec.rank
        if served_rank > self.max_rank:
            raise MethodError(
                f"pftt: global rank {self.global_spec.rank} + personal rank "
                f"{self.personal_spec.rank} = {served_rank} exceeds the served maximum "
                f"{self.max_rank}"
            )
        if not self.prox_mu >= 0:
            raise MethodError(f"prox_mu must be >= 0, got {self.prox_mu!r}")
        if self.wire_dtype not in WIRE_DTYPES:
            raise MethodError(
                f"pftt: wire_dtype must be one of {WIRE_DTYPES}, got {self.wire_dtype!r}"
            )

    def _part(self, rank: int) -> LoraSpec:
        scaling = self.spec.alpha / self.spec.rank
        return LoraSpec(rank=rank, alpha=scaling * rank, target_modules=self.spec.target_modules)

    @property
    def global_spec(self) -> LoraSpec:
        return self._part(self.global_rank or max(1, self.spec.rank // 2))

    @property
    def personal_spec(self) -> LoraSpec:
        return self._part(self.personal_rank or max(1, self.spec.rank - self.spec.rank // 2))

    def loras(self) -> dict[str, LoraSpec]:
        # A user's first personal LoRA is the session's seeded initialization (B = 0, so it
        # starts as a no-op); later rounds continue from the state.
        return {GLOBAL: self.global_spec, PERSONAL: self.personal_spec}

    def init_global(self, *, base_model: ModelInfo, seed: int) -> Params:
        from fedpersona.trainer.learn.lora_train import LoraSession

        return LoraSession(base_model, self.loras(), seed=seed).read(GLOBAL)

    def finish(self, local: LocalRound) -> LocalResult:
        upload, personal = local.session.read(GLOBAL), local.session.read(PERSONAL)
        if local.final:  # the global was frozen: the user is served it with the new personal
            upload = {}
        return LocalResult(
            upload=upload,
            state=personal,
            served=self._compose(local.base_model, local.session.read(GLOBAL), personal),
        )

    def aggregate(self, *, previous: Params, results: list[tuple[Params, int]]) -> Params:
        if without_uploads(results):
            return dict(previous)
        return weighted_mean(results)

    def served_adapter(
        self, *, base_model: ModelInfo, global_params: Params, state: Params
    ) -> LoraAdapter:
        if not state:
            # A user who never trained has no personal part yet: serve the global LoRA.
            return self.adapter(global_params, self.global_spec, base_model)
        return self._compose(base_model, global_params, state)

    def personal_adapter(self, *, base_model: ModelInfo, state: Params) -> LoraAdapter | None:
        """The user's personal LoRA alone (for their private `users/<u>/personal` slot)."""
        if not state:
            raise MethodError("pftt: this user has no personal LoRA yet")
        return self.adapter(state, self.personal_spec, base_model)

    def _compose(
        self, base_model: ModelInfo, global_params: Params, personal: Params
    ) -> LoraAdapter:
        from fedpersona.adapters import compose

        return compose(
            self.adapter(global_params, self.global_spec, base_model),
            self.adapter(personal, self.personal_spec, base_model),
        )
