"""The contract every federated method implements, what it declares about itself, and the
shared client-update template.

A method splits one federated round into pure pieces that a driver (the Flower apps, a test, a
benchmark) calls in order:

    global = method.init_global(...)                                     # server, once
    update = method.client_update(global_params=global, state=s_u, ...)  # client u, each round
    global = method.aggregate(previous=global, results=[(upload, n)...]) # server, each round
    adapter = method.served_adapter(global_params=global, state=s_u')    # what user u is served

`ClientUpdate.upload` is exactly what leaves the client; `ClientUpdate.state` never does (the
driver keeps it on the client, e.g. in Flower's `context.state`). Every method also declares its
`Behaviour`: what it uploads, what a round publishes (and so to which store slots) and which base
model it trains (the large, served one or the small proxy). Drivers read the behaviour and never
branch on a method's name.

`LoraMethod` is the template the built-in methods share: one local session of named LoRAs per
client round, FedProx on the shared LoRA, deterministic batch order; a method fills in only what
its round makes of the trained session. The training code (torch, PEFT, transformers) is imported
when a client round runs, so importing a method (to list it, read its behaviour or aggregate) does
not load it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np
from fedpersona.adapters import Slot
from fedpersona.adapters.limits import MAX_LORA_RANK
from fedpersona.adapters.preferences import reward_mix_problem
from fedpersona.trainer.errors import MethodError

if TYPE_CHECKING:
    from fedpersona.adapters import LoraAdapter
    from fedpersona.trainer.learn.lora_train import LocalTrainer, LoraSession
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
DEFAULT_MAX_RANK = MAX_LORA_RANK


@dataclass(frozen=True)
class TrainConfig:
    """Local training of one client in one round."""

    steps: int
    lr: float
    batch_size: int
    max_len: int
    seed: int
    prox_mu: float = 0.0  # FedProx: adds prox_mu / 2 * ||w - w_global||^2 on the shared LoRA
    total_rounds: int = 0  # rounds of the run (0: unknown; a method then never personalizes)
    # The user's reward mix lambda_u, read by the driver where the method's behaviour has
    # rewards (`fedpersona.adapters.preferences`); None: the default mix.
    reward_mix: float | None = None

    def __post_init__(self) -> None:
        if self.total_rounds < 0:
            raise MethodError(f"TrainConfig.total_rounds must be >= 0, got {self.total_rounds!r}")
        for name in ("steps", "batch_size", "max_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MethodError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise MethodError(f"TrainConfig.lr must be positive, got {self.lr!r}")
        if not self.prox_mu >= 0:
            raise MethodError(f"TrainConfig.prox_mu must be >= 0, got {self.prox_mu!r}")
        if self.reward_mix is not None:
            problem = reward_mix_problem(self.reward_mix)
            if problem is not None:
                raise MethodError(f"TrainConfig.reward_mix {problem}")


@dataclass
class ClientUpdate:
    """The result of one client's local round."""

    upload: Params  # exactly what goes to the server (may be empty)
    num_examples: int  # training chats used; the aggregation weight
    metrics: dict[str, float]  # train_loss, train_loss_first, train_loss_last, ...
    state: Params  # what the client keeps across rounds (personal LoRA, masks); never uploaded
    served: LoraAdapter  # this user's servable adapter after this round's local training


class BaseRole(StrEnum):
    """Which base model a method trains (`<home>/models/<role>`)."""

    LARGE = "large"  # the served model: the method's LoRAs are served by vLLM on it
    SMALL = "small"  # the proxy model: the method's LoRAs steer the large one as experts


class Shares(StrEnum):
    """What a client uploads each round."""

    NOTHING = "nothing"  # the upload is empty (local-only)
    LORA = "lora"  # the whole trained LoRA (FedAvg, FedProx, FedPT)
    GLOBAL_LORA = "global-lora"  # only the global one of its LoRAs (PFTT)
    SPARSE_LORA = "sparse-lora"  # the kept entries of a pruned LoRA and its bit mask (PerFIT)
    LORA_A = "lora-a"  # only the A matrices of its LoRA (FedSA-LoRA)


class Product(StrEnum):
    """What a round publishes to the store."""

    GLOBAL = "global"  # the new global part, once per round
    SERVED = "served"  # per participant: the LoRA vLLM serves them (`users/<u>/served`)
    PERSONAL = "personal"  # per participant: their personal LoRA, published by the client itself
    EXPERTS = "experts"  # global and per-user parts as proxy-tuning experts, not served LoRAs


@dataclass(frozen=True)
class Behaviour:
    """What a method shares, publishes and trains on; drivers read this, never the name.

    A round publishes, per participant, exactly one of a served LoRA (`SERVED`, on the large
    model) or an expert (`EXPERTS`, on the small model); `GLOBAL` adds the global part.
    """

    shares: Shares
    publishes: frozenset[Product]
    base_role: BaseRole
    # Trained on reward models (RLHF, e.g. PFIT) rather than on the chats' likelihood: held-out
    # perplexity does not measure it, so perplexity comparisons (`fedpersona eval`) leave it out.
    rewards: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "publishes", frozenset(self.publishes))
        per_user = {Product.SERVED, Product.EXPERTS} & self.publishes
        if len(per_user) != 1:
            raise MethodError(
                f"a method publishes exactly one of served or experts per user, got {per_user}"
            )
        needed = BaseRole.SMALL if Product.EXPERTS in self.publishes else BaseRole.LARGE
        if self.base_role != needed:
            raise MethodError(f"a method publishing {per_user} trains the {needed} model")

    @property
    def experts(self) -> bool:
        return Product.EXPERTS in self.publishes

    def global_slot(self, method: str) -> Slot | None:
        """Where a round's global part goes (None: the method has none)."""
        if Product.GLOBAL not in self.publishes:
            return None
        return Slot.global_expert() if self.experts else Slot.global_adapter(method)

    def user_slot(self, user: str) -> Slot:
        """Where a participant's adapter goes: their served LoRA or their expert."""
        return Slot.user_expert(user) if self.experts else Slot.user_served(user)


class Method(Protocol):
    """One federated method (FedAvg, FedProx, local-only, PFTT, PerFIT, FedPT)."""

    @property
    def name(self) -> str: ...

    @property
    def behaviour(self) -> Behaviour: ...

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

    def personal_adapter(self, *, base_model: ModelInfo, state: Params) -> LoraAdapter | None:
        """The user's personal LoRA alone (for `users/<u>/personal`); only called for methods
        whose behaviour publishes `Product.PERSONAL`, with a non-empty state (None: the state
        holds no personal LoRA yet, e.g. PerFIT's masks before its personalization round)."""
        ...


def method_settings(method: Method) -> dict[str, object]:
    """A method's class and options as JSON-safe data (what a client state is bound to)."""
    settings: dict[str, object] = {"class": type(method).__qualname__, "name": method.name}
    if dataclasses.is_dataclass(method):
        for f in dataclasses.fields(method):
            value = getattr(method, f.name)
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                value = dataclasses.asdict(value)
            settings[f.name] = value
    return json.loads(json.dumps(settings, default=str))


def without_uploads(results: list[tuple[Params, int]]) -> bool:
    """True when no client uploaded anything (a personalization round): the global stays."""
    return all(not upload for upload, _ in results)


def order_seed(config: TrainConfig, *, round_idx: int, silo: Path) -> tuple[int, ...]:
    """Seed words for one client's batch order: run seed, round and a stable hash of the silo.

    Different users and rounds see different orders; the same inputs always the same order.
    """
    digest = hashlib.sha256(Path(silo).name.encode("utf-8")).digest()
    return (config.seed, round_idx, int.from_bytes(digest[:8], "big"))


def adapter_from_params(params: Params, *, spec: LoraSpec, base_model: str) -> LoraAdapter:
    """A servable `LoraAdapter` from PEFT-keyed arrays (copies the data)."""
    import torch
    from fedpersona.adapters import LoraAdapter

    tensors = {
        key: torch.tensor(np.asarray(value, dtype=np.float32)) for key, value in params.items()
    }
    return LoraAdapter(
        r=spec.rank,
        alpha=spec.alpha,
        target_modules=spec.target_modules,
        base_model=base_model,
        tensors=tensors,
    )


# ------------------------------------------------------------------------ client template


@dataclass
class LocalRound:
    """One client's round in progress: its inputs and the trained session (`LoraMethod`)."""

    base_model: ModelInfo
    silo: Path
    global_params: Params
    state: Params
    config: TrainConfig
    round_idx: int
    session: LoraSession
    trainer: LocalTrainer
    final: bool = False  # the personalization round: only personal parts train, nothing is sent


@dataclass
class LocalResult:
    """What a method makes of a trained session: the `ClientUpdate` less what the template adds."""

    upload: Params
    state: Params
    served: LoraAdapter
    metrics: dict[str, float] = field(default_factory=dict)


class LoraMethod:
    """The client-update template: named LoRAs trained jointly on one local session.

    A subclass names its LoRAs (`loras`, all trained, in a fixed order that seeds their
    initialization), which one starts from the global params and carries the FedProx term
    (`SHARED`, None: nothing shared), which one starts from the client state (`KEPT`), and what
    a trained round yields (`finish`; it may train further, e.g. PerFIT's pruning search). The
    template loads the session and the user's chats, trains `config.steps` steps unless
    `finish` trains itself (`TRAINS_ITSELF`), and assembles the `ClientUpdate`.

    Personalization round: a method with `personal_round` set spends the last round of a run
    (`TrainConfig.total_rounds` > 1) on the user's personal part only, against the last
    aggregate: `trainable(final=True)` says what trains, no FedProx term applies, the upload is
    empty (so `aggregate` keeps the global: `without_uploads`) and what the user is served is
    exactly what was trained on top of the global they were sent.
    """

    name: str
    spec: LoraSpec
    prox_mu: float = 0.0
    personal_round: bool = False
    SHARED: ClassVar[str | None] = None
    KEPT: ClassVar[str | None] = None
    TRAINS_ITSELF: ClassVar[bool] = False

    def loras(self) -> dict[str, LoraSpec]:
        raise NotImplementedError

    def personalizes(self, config: TrainConfig, round_idx: int) -> bool:
        """Whether round `round_idx` is this run's personalization round."""
        return self.personal_round and config.total_rounds > 1 and round_idx >= config.total_rounds

    def prepare(
        self, session: LoraSession, *, global_params: Params, state: Params, final: bool
    ) -> None:
        """Load a round's starting point: the global into `SHARED`, the state into `KEPT`."""
        if self.SHARED is not None:
            session.write(self.SHARED, global_params)
        if self.KEPT is not None and state:
            # A first round starts from the session's seeded initialization instead.
            session.write(self.KEPT, state)

    def trainable(self, *, final: bool) -> dict[str, Callable[[str], bool] | None]:
        """Adapters trained this round, each with a filter of its keys (None: all of them)."""
        if final and self.KEPT is not None:
            return {self.KEPT: None}
        return {name: None for name in self.loras()}

    def finish(self, local: LocalRound) -> LocalResult:
        raise NotImplementedError

    def personal_adapter(self, *, base_model: ModelInfo, state: Params) -> LoraAdapter | None:
        raise MethodError(f"{self.name}: keeps no personal LoRA")

    def proximal_mu(self, config: TrainConfig) -> float:
        """The FedProx coefficient of a round: the run's (`config.prox_mu`) if set, else ours."""
        return config.prox_mu if config.prox_mu > 0 else self.prox_mu

    def adapter(self, params: Params, spec: LoraSpec, base_model: ModelInfo) -> LoraAdapter:
        return adapter_from_params(params, spec=spec, base_model=base_model.name)

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
        # Imported here: torch, PEFT and transformers load only where a client trains.
        from fedpersona.trainer.data.silo import load_examples
        from fedpersona.trainer.learn.lora_train import LocalTrainer, LoraSession

        loras = self.loras()
        final = self.personalizes(config, round_idx)
        session = LoraSession(base_model, loras, seed=config.seed)
        self.prepare(session, global_params=global_params, state=state, final=final)
        examples = load_examples(silo, "train", session.tokenizer, max_len=config.max_len)
        prox: dict[str, Params] | None = None
        extra: dict[str, float] = {"personalization_round": float(final)}
        trainable = self.trainable(final=final)
        if self.SHARED is not None and self.SHARED in trainable and not final:
            mu = self.proximal_mu(config)
            config = dataclasses.replace(config, prox_mu=mu)
            prox = {self.SHARED: global_params}
            extra["prox_mu"] = mu
        else:
            config = dataclasses.replace(config, prox_mu=0.0)
        trainer = LocalTrainer(
            session,
            examples,
            config=config,
            adapters=list(trainable),
            order_seed=order_seed(config, round_idx=round_idx, silo=silo),
            prox=prox,
            key_filters=trainable,
        )
        if not self.TRAINS_ITSELF:
            trainer.run(config.steps)
        local = LocalRound(
            base_model=base_model,
            silo=silo,
            global_params=global_params,
            state=state,
            config=config,
            round_idx=round_idx,
            session=session,
            trainer=trainer,
            final=final,
        )
        result = self.finish(local)
        return ClientUpdate(
            upload=result.upload,
            num_examples=len(examples),
            metrics={**trainer.metrics(), **extra, **result.metrics},
            state=result.state,
            served=result.served,
        )
