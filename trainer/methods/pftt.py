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
A FedProx term (`prox_mu`), if set, applies to the global LoRA only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from fedpersona.adapters import LoraAdapter, compose
from fedpersona.trainer.data.silo import load_examples
from fedpersona.trainer.errors import MethodError
from fedpersona.trainer.learn.lora_train import LocalTrainer, LoraSession, adapter_from_params
from fedpersona.trainer.methods.aggregation import weighted_mean
from fedpersona.trainer.methods.base import (
    DEFAULT_MAX_RANK,
    DEFAULT_SPEC,
    ClientUpdate,
    LoraSpec,
    Params,
    TrainConfig,
    order_seed,
)
from fedpersona.trainer.models.basemodel import ModelInfo

GLOBAL = "global"
PERSONAL = "personal"


@dataclass(frozen=True)
class Pftt:
    """Global LoRA (FedAvg) + personal LoRA (client only), served composed.

    `spec` is the rank budget of the comparison (FedAvg's LoRA, default rank 8): the global LoRA
    gets `spec.rank // 2` of it and the personal LoRA the rest (override with `global_rank` /
    `personal_rank`), both on `spec`'s target modules with its scaling `alpha / rank`.
    """

    spec: LoraSpec = DEFAULT_SPEC
    global_rank: int | None = None
    personal_rank: int | None = None
    prox_mu: float = 0.0
    max_rank: int = DEFAULT_MAX_RANK
    name: str = "pftt"

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

    def _part(self, rank: int) -> LoraSpec:
        scaling = self.spec.alpha / self.spec.rank
        return LoraSpec(rank=rank, alpha=scaling * rank, target_modules=self.spec.target_modules)

    @property
    def global_spec(self) -> LoraSpec:
        return self._part(self.global_rank or max(1, self.spec.rank // 2))

    @property
    def personal_spec(self) -> LoraSpec:
        return self._part(self.personal_rank or max(1, self.spec.rank - self.spec.rank // 2))

    def _session(self, base_model: ModelInfo, *, seed: int) -> LoraSession:
        return LoraSession(
            base_model, {GLOBAL: self.global_spec, PERSONAL: self.personal_spec}, seed=seed
        )

    def init_global(self, *, base_model: ModelInfo, seed: int) -> Params:
        return self._session(base_model, seed=seed).read(GLOBAL)

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
        # A user's first personal LoRA is the session's seeded initialization (B = 0, so it
        # starts as a no-op); later rounds continue from the state.
        session = self._session(base_model, seed=config.seed)
        session.write(GLOBAL, global_params)
        if state:
            session.write(PERSONAL, state)
        examples = load_examples(silo, "train", session.tokenizer, max_len=config.max_len)
        mu = config.prox_mu if config.prox_mu > 0 else self.prox_mu
        trainer = LocalTrainer(
            session,
            examples,
            config=dataclasses.replace(config, prox_mu=mu),
            adapters=[GLOBAL, PERSONAL],
            order_seed=order_seed(config, round_idx=round_idx, silo=silo),
            prox={GLOBAL: global_params},
        )
        trainer.run(config.steps)
        upload, personal = session.read(GLOBAL), session.read(PERSONAL)
        return ClientUpdate(
            upload=upload,
            num_examples=len(examples),
            metrics={**trainer.metrics(), "prox_mu": mu},
            state=personal,
            served=self._compose(base_model, upload, personal),
        )

    def aggregate(self, *, previous: Params, results: list[tuple[Params, int]]) -> Params:
        return weighted_mean(results)

    def served_adapter(
        self, *, base_model: ModelInfo, global_params: Params, state: Params
    ) -> LoraAdapter:
        if not state:
            # A user who never trained has no personal part yet: serve the global LoRA.
            return adapter_from_params(
                global_params, spec=self.global_spec, base_model=base_model.name
            )
        return self._compose(base_model, global_params, state)

    def personal_adapter(self, *, base_model: ModelInfo, state: Params) -> LoraAdapter:
        """The user's personal LoRA alone (for their private `users/<u>/personal` slot)."""
        if not state:
            raise MethodError("pftt: this user has no personal LoRA yet")
        return adapter_from_params(state, spec=self.personal_spec, base_model=base_model.name)

    def _compose(
        self, base_model: ModelInfo, global_params: Params, personal: Params
    ) -> LoraAdapter:
        return compose(
            adapter_from_params(global_params, spec=self.global_spec, base_model=base_model.name),
            adapter_from_params(personal, spec=self.personal_spec, base_model=base_model.name),
        )
