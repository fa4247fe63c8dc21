"""FedPT (federated proxy-tuning, arXiv 2410.00362): federated LoRA tuning of the SMALL model.

Users run FedAvg over one LoRA on the small base model (cheap on a client: a fraction of the
large model's compute, memory and upload). The result is never merged into the large model: its
behaviour publishes proxy experts (`Slot.global_expert()`, and per user `Slot.user_expert(u)`),
and at serving time vLLM's logits processor adds `alpha * (expert(x) - small(x))` to the large
model's logits (`service/proxy_tuning/`).

Two ways in:
- `FedPT`, registered as `get_method("fedpt")`: `FedAvg` on the small model, plus an optional
  personal part (`personal_steps` > 0: after its shared training each client keeps fine-tuning
  a private copy, which becomes its own expert and is never uploaded). The Flower apps run it
  like every other method; its `behaviour` tells them the base model and the slots.
- `run_fedpt` / `publish_experts`: the same rounds in-process (no Flower), for tests,
  benchmarks and scripts; personal experts are the final global fine-tuned on each user's data.

This module trains and aggregates; it knows nothing about vLLM or the gateway.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fedpersona.adapters import AdapterStore, Slot
from fedpersona.adapters.limits import EXPERT_MAX_RANK
from fedpersona.trainer.errors import MethodError
from fedpersona.trainer.methods.base import (
    BaseRole,
    Behaviour,
    LocalResult,
    LocalRound,
    LoraSpec,
    Params,
    Product,
    Shares,
    TrainConfig,
    adapter_from_params,
    order_seed,
)
from fedpersona.trainer.methods.fedavg import SHARED, FedAvg

if TYPE_CHECKING:
    from fedpersona.adapters import LoraAdapter
    from fedpersona.trainer.models.basemodel import ModelInfo

log = logging.getLogger(__name__)


def expert_slots(users: list[str]) -> tuple[Slot, dict[str, Slot]]:
    """Where FedPT publishes (its behaviour's slots): the global expert and each user's."""
    method = FedPT()
    global_slot = method.behaviour.global_slot(method.name)
    if global_slot is None:
        raise MethodError("fedpt: its behaviour names no global expert slot")
    return global_slot, {u: method.behaviour.user_slot(u) for u in users}


def params_nbytes(params: Mapping[str, object]) -> int:
    """Bytes of an upload (float32 arrays)."""
    return sum(int(getattr(v, "nbytes", 0)) for v in params.values())


@dataclass(frozen=True)
class FedPT(FedAvg):
    """FedAvg of one LoRA on the small model, published as proxy experts."""

    personal_steps: int = 0
    max_rank: int = EXPERT_MAX_RANK
    name: str = "fedpt"

    def __post_init__(self) -> None:
        if self.personal_steps < 0:
            raise MethodError(f"personal_steps must be >= 0, got {self.personal_steps}")
        if self.spec.rank > self.max_rank:
            raise MethodError(f"rank {self.spec.rank} exceeds the expert maximum {self.max_rank}")
        if not self.prox_mu >= 0:
            raise MethodError(f"prox_mu must be >= 0, got {self.prox_mu!r}")

    @property
    def behaviour(self) -> Behaviour:
        publishes = {Product.GLOBAL, Product.EXPERTS}
        if self.personal_steps > 0:
            publishes.add(Product.PERSONAL)
        return Behaviour(
            shares=Shares.LORA, publishes=frozenset(publishes), base_role=BaseRole.SMALL
        )

    def finish(self, local: LocalRound) -> LocalResult:
        shared = super().finish(local)
        if self.personal_steps == 0:
            return shared
        personal, metrics = personalize(
            base_model=local.base_model,
            silo=local.silo,
            start=shared.upload,
            spec=self.spec,
            config=local.config,
            steps=self.personal_steps,
            round_idx=local.round_idx,
        )
        return LocalResult(
            upload=shared.upload,
            state=personal,
            served=self.adapter(personal, self.spec, local.base_model),
            metrics={f"personal_{k}": v for k, v in metrics.items()},
        )

    def served_adapter(
        self, *, base_model: ModelInfo, global_params: Params, state: Params
    ) -> LoraAdapter:
        """The user's expert: their personal LoRA if they keep one, else the global one."""
        return self.adapter(state if state else global_params, self.spec, base_model)

    def personal_adapter(self, *, base_model: ModelInfo, state: Params) -> LoraAdapter:
        """The user's personal expert alone (for their private `users/<u>/personal` slot)."""
        return self.adapter(state, self.spec, base_model)


def personalize(
    *,
    base_model: ModelInfo,
    silo: Path,
    start: Params,
    spec: LoraSpec,
    config: TrainConfig,
    steps: int,
    round_idx: int = 0,
) -> tuple[Params, dict[str, float]]:
    """`start` fine-tuned for `steps` on the user's own chats (stays on the client)."""
    from fedpersona.trainer.data.silo import load_examples
    from fedpersona.trainer.learn.lora_train import LocalTrainer, LoraSession

    session = LoraSession(base_model, {SHARED: spec}, seed=config.seed)
    session.write(SHARED, start)
    examples = load_examples(silo, "train", session.tokenizer, max_len=config.max_len)
    trainer = LocalTrainer(
        session,
        examples,
        config=config,
        adapters=[SHARED],
        order_seed=(*order_seed(config, round_idx=round_idx, silo=silo), 1),
    )
    trainer.run(steps)
    return session.read(SHARED), trainer.metrics()


# --------------------------------------------------------------------------- in-process driver


@dataclass
class FedPTResult:
    global_params: Params
    personal: dict[str, Params]
    rounds: list[dict[str, float]] = field(default_factory=list)
    upload_bytes: int = 0  # everything clients sent, all rounds
    client_seconds: float = 0.0  # local training time, all clients and rounds
    global_version: str | None = None
    user_versions: dict[str, str] = field(default_factory=dict)


def run_fedpt(
    *,
    small: ModelInfo,
    silos: Mapping[str, Path],
    rounds: int,
    config: TrainConfig,
    method: FedPT | None = None,
    personal_steps: int = 0,
    progress: Callable[[str], None] | None = None,
) -> FedPTResult:
    """FedAvg rounds over every silo's user on the small model, then per-user personalization.

    Every user takes part in every round. Returns the global LoRA, the personal ones (empty if
    `personal_steps` is 0) and what the clients spent (seconds, upload bytes).
    """
    if rounds < 1:
        raise MethodError(f"rounds must be at least 1, got {rounds}")
    if not silos:
        raise MethodError("run_fedpt needs at least one user silo")
    method = method or FedPT()
    global_params = method.init_global(base_model=small, seed=config.seed)
    result = FedPTResult(global_params=global_params, personal={})
    for round_idx in range(1, rounds + 1):
        results: list[tuple[Params, int]] = []
        losses: list[float] = []
        for user, silo in sorted(silos.items()):
            started = time.perf_counter()
            update = method.client_update(
                base_model=small,
                silo=silo,
                global_params=global_params,
                state={},
                config=config,
                round_idx=round_idx,
            )
            result.client_seconds += time.perf_counter() - started
            result.upload_bytes += params_nbytes(update.upload)
            results.append((update.upload, update.num_examples))
            losses.append(update.metrics.get("train_loss", float("nan")))
            if progress is not None:
                progress(f"round {round_idx}: {user} trained")
        global_params = method.aggregate(previous=global_params, results=results)
        result.rounds.append({"round": float(round_idx), "train_loss": sum(losses) / len(losses)})
        log.info("fedpt round %d: mean train loss %.4f", round_idx, result.rounds[-1]["train_loss"])
    result.global_params = global_params
    if personal_steps > 0:
        for user, silo in sorted(silos.items()):
            result.personal[user], _ = personalize(
                base_model=small,
                silo=silo,
                start=global_params,
                spec=method.spec,
                config=config,
                steps=personal_steps,
                round_idx=rounds + 1,
            )
    return result


def publish_experts(
    store: AdapterStore,
    *,
    small: ModelInfo,
    spec: LoraSpec,
    result: FedPTResult,
    users: list[str],
    metadata: Mapping[str, object] | None = None,
) -> FedPTResult:
    """Publish the global expert and one expert per user (personal if any, else the global).

    Fills `result.global_version` and `result.user_versions`.
    """
    global_slot, user_slots = expert_slots(users)
    meta = {"algorithm": FedPT.name, **(metadata or {})}
    glob = adapter_from_params(result.global_params, spec=spec, base_model=small.name)
    result.global_version = store.publish_lora(global_slot, glob, metadata=meta).id
    for user, slot in user_slots.items():
        params = result.personal.get(user, result.global_params)
        adapter = adapter_from_params(params, spec=spec, base_model=small.name)
        version = store.publish_lora(slot, adapter, metadata={**meta, "user": user})
        result.user_versions[user] = version.id
    return result
