"""PerFIT (personalized federated instruction tuning via NAS, arXiv 2402.16919).

Every client trains an *expanded* LoRA (`expansion` x the rank of the budget LoRA, default
2 x 8 = 16) and, the first time it takes part, searches its own sparse architecture: local
training is interleaved with `prune_iterations` rounds of Taylor-importance pruning
(`|w * dL/dw|` summed over `importance_batches` batches) that shrink the kept entries linearly
from the expanded size to exactly the budget (the parameter count of the rank-`rank` LoRA).
The resulting 0/1 mask is the user's personal architecture; it is kept in the client state and
reused in later rounds (the search runs once per user; later rounds fine-tune it).

Upload: the kept values and the bit-packed mask (`fedpersona.trainer.methods.pruning.pack_sparse`),
i.e. the
budget's values plus one bit per expanded entry. The server averages each entry over the
clients that kept it, weighted by examples; entries no participant kept keep their previous
global value (`fedpersona.trainer.methods.aggregation.masked_weighted_mean`). A user is served the
global LoRA
with their own mask applied: a rank-`expansion * rank` LoRA with at most `budget` non-zeros.
A user without a mask yet (never trained) is served the dense global LoRA.

With `personal_round` (the evaluation's setting, `docs/evaluation.md`) the last round of a run
fine-tunes the user's masked copy of the final global on their own chats, for the same local
steps, uploads nothing, and keeps the result (`state`: the masks and these values) as the
user's personal sparse LoRA, published to their private slot and served: the final aggregate
re-trained locally under the user's own architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from fedpersona.trainer.errors import MethodError
from fedpersona.trainer.methods.aggregation import masked_weighted_mean
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
from fedpersona.trainer.methods.pruning import (
    MASK_SUFFIX,
    apply_mask,
    budget_schedule,
    full_mask,
    kept,
    pack_sparse,
    prune_to_budget,
    unpack_sparse,
)

if TYPE_CHECKING:
    from fedpersona.adapters import LoraAdapter
    from fedpersona.trainer.learn.lora_train import LocalTrainer
    from fedpersona.trainer.models.basemodel import ModelInfo

LORA = "expanded"


@dataclass(frozen=True)
class PerFit(LoraMethod):
    """Expanded LoRA pruned to a personal sparse architecture; masked parameter-wise FedAvg."""

    spec: LoraSpec = DEFAULT_SPEC  # the parameter budget (FedAvg's LoRA)
    expansion: int = 2
    prune_iterations: int = 3
    importance_batches: int = 2
    prox_mu: float = 0.0
    personal_round: bool = False
    max_rank: int = DEFAULT_MAX_RANK
    name: str = "perfit"
    SHARED: ClassVar[str | None] = LORA
    TRAINS_ITSELF: ClassVar[bool] = True  # the first round searches the architecture
    behaviour: ClassVar[Behaviour] = Behaviour(
        shares=Shares.SPARSE_LORA,
        publishes=frozenset({Product.GLOBAL, Product.SERVED, Product.PERSONAL}),
        base_role=BaseRole.LARGE,
    )

    def __post_init__(self) -> None:
        if self.expansion < 1:
            raise MethodError(f"perfit: expansion must be >= 1, got {self.expansion}")
        if self.prune_iterations < 1 or self.importance_batches < 1:
            raise MethodError("perfit: prune_iterations and importance_batches must be >= 1")
        if self.expanded.rank > self.max_rank:
            raise MethodError(
                f"perfit: expanded rank {self.expanded.rank} exceeds the served maximum "
                f"{self.max_rank}"
            )

    @property
    def expanded(self) -> LoraSpec:
        """The trained LoRA: `expansion` x the rank, same scaling (alpha / rank)."""
        return LoraSpec(
            rank=self.spec.rank * self.expansion,
            alpha=self.spec.alpha * self.expansion,
            target_modules=self.spec.target_modules,
        )

    def budget(self, params: Params) -> int:
        """Entries of the rank-`spec.rank` LoRA with the same modules as `params` (expanded)."""
        total = sum(int(np.size(v)) for v in params.values())
        return total // self.expansion  # A [r_e, in] and B [out, r_e]: linear in the rank

    def loras(self) -> dict[str, LoraSpec]:
        return {LORA: self.expanded}

    def init_global(self, *, base_model: ModelInfo, seed: int) -> Params:
        from fedpersona.trainer.learn.lora_train import LoraSession

        return LoraSession(base_model, self.loras(), seed=seed).read(LORA)

    def finish(self, local: LocalRound) -> LocalResult:
        trainer, steps = local.trainer, local.config.steps
        budget = self.budget(local.global_params)
        mask = self._mask_from_state(local.state, like=local.global_params)
        searched = mask is None
        if mask is None:
            mask = self._search(trainer, steps, budget=budget)
        else:
            trainer.set_masks({LORA: mask})
            trainer.run(steps)
        params = apply_mask(local.session.read(LORA), mask)
        state = {key + MASK_SUFFIX: m for key, m in mask.items()}
        if local.final:  # the personal sparse LoRA stays here; nothing is sent
            state.update(params)
        return LocalResult(
            upload={} if local.final else pack_sparse(params, mask),
            state=state,
            served=self.adapter(params, self.expanded, local.base_model),
            metrics={
                "kept_entries": float(kept(mask)),
                "budget_entries": float(budget),
                "searched": float(searched),
            },
        )

    def _search(self, trainer: LocalTrainer, steps: int, *, budget: int) -> Params:
        """Train `steps` steps, pruning `prune_iterations` times on the way down to `budget`."""
        mask = full_mask(trainer.session.read(LORA))
        targets = budget_schedule(kept(mask), budget, self.prune_iterations)
        # Prune after k / (iterations + 1) of the steps: the first chunk trains the dense LoRA
        # (at initialization B = 0, so every importance would be 0), the last fine-tunes the
        # final architecture.
        done = 0
        for k, target in enumerate(targets, start=1):
            boundary = k * steps // (self.prune_iterations + 1)
            trainer.run(boundary - done)
            done = boundary
            scores = trainer.importance(LORA, batches=self.importance_batches)
            mask = prune_to_budget(scores, mask, target)
            trainer.set_masks({LORA: mask})
        trainer.run(steps - done)
        return mask

    def _mask_from_state(self, state: Params, *, like: Params) -> Params | None:
        masks = {k for k in state if k.endswith(MASK_SUFFIX)}
        if not masks:
            return None
        expected = {key + MASK_SUFFIX for key in like}
        if masks != expected:
            raise MethodError("perfit: the client state does not hold a mask for this LoRA")
        mask = {key: np.asarray(state[key + MASK_SUFFIX], np.float32) for key in like}
        for key, m in mask.items():
            if m.shape != np.shape(like[key]):
                raise MethodError(f"perfit: state mask {key!r} has shape {m.shape}")
        return mask

    def aggregate(self, *, previous: Params, results: list[tuple[Params, int]]) -> Params:
        if without_uploads(results):
            return dict(previous)
        dense = []
        for upload, n in results:
            values, masks = unpack_sparse(upload, like=previous)
            dense.append((values, masks, n))
        return masked_weighted_mean(previous, dense)

    def served_adapter(
        self, *, base_model: ModelInfo, global_params: Params, state: Params
    ) -> LoraAdapter:
        personal = self._personal_values(state)
        if personal:
            return self.adapter(personal, self.expanded, base_model)
        mask = self._mask_from_state(state, like=global_params)
        params = global_params if mask is None else apply_mask(global_params, mask)
        return self.adapter(params, self.expanded, base_model)

    def personal_adapter(self, *, base_model: ModelInfo, state: Params) -> LoraAdapter | None:
        """The personal sparse LoRA of a personalization round (None before one)."""
        personal = self._personal_values(state)
        return self.adapter(personal, self.expanded, base_model) if personal else None

    @staticmethod
    def _personal_values(state: Params) -> Params:
        return {k: v for k, v in state.items() if not k.endswith(MASK_SUFFIX)}
