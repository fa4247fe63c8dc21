"""FedAvg (and FedProx): one LoRA shared by everyone, averaged weighted by example count.

Each client starts from the global LoRA, trains it on its own chats and uploads all of it; the
server replaces the global by the example-weighted mean. With a proximal coefficient `mu > 0`
local training adds `mu / 2 * ||w - w_global||^2` (FedProx, Li et al. 2020), which keeps
clients with very different data from drifting far from the global model. A user is served the
global LoRA (after local training: their locally trained copy). Nothing stays on the client.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from fedpersona.adapters import LoraAdapter
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

SHARED = "shared"


@dataclass(frozen=True)
class FedAvg:
    """FedAvg over one LoRA; `prox_mu` > 0 makes it FedProx (a `TrainConfig.prox_mu` > 0 wins)."""

    spec: LoraSpec = DEFAULT_SPEC
    prox_mu: float = 0.0
    max_rank: int = DEFAULT_MAX_RANK
    name: str = "fedavg"

    def __post_init__(self) -> None:
        if self.spec.rank > self.max_rank:
            raise MethodError(f"rank {self.spec.rank} exceeds the served maximum {self.max_rank}")
        if not self.prox_mu >= 0:
            raise MethodError(f"prox_mu must be >= 0, got {self.prox_mu!r}")

    def _mu(self, config: TrainConfig) -> float:
        return config.prox_mu if config.prox_mu > 0 else self.prox_mu

    def init_global(self, *, base_model: ModelInfo, seed: int) -> Params:
        return LoraSession(base_model, {SHARED: self.spec}, seed=seed).read(SHARED)

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
        session = LoraSession(base_model, {SHARED: self.spec}, seed=config.seed)
        session.write(SHARED, global_params)
        examples = load_examples(silo, "train", session.tokenizer, max_len=config.max_len)
        mu = self._mu(config)
        trainer = LocalTrainer(
            session,
            examples,
            config=dataclasses.replace(config, prox_mu=mu),
            adapters=[SHARED],
            order_seed=order_seed(config, round_idx=round_idx, silo=silo),
            prox={SHARED: global_params},
        )
        trainer.run(config.steps)
        upload = session.read(SHARED)
        return ClientUpdate(
            upload=upload,
            num_examples=len(examples),
            metrics={**trainer.metrics(), "prox_mu": mu},
            state={},
            served=adapter_from_params(upload, spec=self.spec, base_model=base_model.name),
        )

    def aggregate(self, *, previous: Params, results: list[tuple[Params, int]]) -> Params:
        return weighted_mean(results)

    def served_adapter(
        self, *, base_model: ModelInfo, global_params: Params, state: Params
    ) -> LoraAdapter:
        return adapter_from_params(global_params, spec=self.spec, base_model=base_model.name)
