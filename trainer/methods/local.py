"""Local-only baseline: every user trains their own LoRA alone; nothing is shared.

The upload is empty and the global parameters are empty; the user's LoRA lives in the client
state and starts, in the first round, from the same seeded initialization FedAvg would use.
This is the lower bound on communication and the "no collaboration" reference for the
personalized methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedpersona.adapters import LoraAdapter
from fedpersona.trainer.data.silo import load_examples
from fedpersona.trainer.errors import MethodError
from fedpersona.trainer.learn.lora_train import LocalTrainer, LoraSession, adapter_from_params
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

OWN = "own"


@dataclass(frozen=True)
class LocalOnly:
    """Each user's own LoRA, trained only on their data."""

    spec: LoraSpec = DEFAULT_SPEC
    max_rank: int = DEFAULT_MAX_RANK
    name: str = "local"

    def __post_init__(self) -> None:
        if self.spec.rank > self.max_rank:
            raise MethodError(f"rank {self.spec.rank} exceeds the served maximum {self.max_rank}")

    def init_global(self, *, base_model: ModelInfo, seed: int) -> Params:
        return {}

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
        session = LoraSession(base_model, {OWN: self.spec}, seed=config.seed)
        if state:
            session.write(OWN, state)
        examples = load_examples(silo, "train", session.tokenizer, max_len=config.max_len)
        trainer = LocalTrainer(
            session,
            examples,
            config=config,
            adapters=[OWN],
            order_seed=order_seed(config, round_idx=round_idx, silo=silo),
        )
        trainer.run(config.steps)
        own = session.read(OWN)
        return ClientUpdate(
            upload={},
            num_examples=len(examples),
            metrics=trainer.metrics(),
            state=own,
            served=adapter_from_params(own, spec=self.spec, base_model=base_model.name),
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
        return adapter_from_params(state, spec=self.spec, base_model=base_model.name)
