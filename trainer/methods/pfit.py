"""PFIT (personalized federated instruction tuning with RLHF, arXiv 2404.13238), and its dense
federated-RLHF baseline.

Each client fine-tunes the policy's LoRAs by reinforcement learning (RLOO with a KL penalty to
the base model, `fedpersona.trainer.rlhf.rloo`) on prompts from its own silo, rewarded by
`lambda_u * r_helpfulness + (1 - lambda_u) * r_safety`: two reward models that run on the client
only (`<home>/models/rewards/{helpfulness,safety}` beside the base model, or `rewards_dir`),
mixed by the user's own lambda_u (`TrainConfig.reward_mix`): the driver reads it each round from
the user's preferences in the store (`fedpersona.adapters.preferences`), where the operator sets
it through the gateway's admin API or `fedpersona users reward-mix`; unset, the default mix.

What is shared and what stays personal (`Pfit`):
- a *global* LoRA (half the rank budget, attention projections), aggregated across users. Sparse
  exchange in the spirit of the paper's sparse self-attention: each round a client scores every
  global LoRA module (one attention projection of one layer) by the norm of its RL policy
  gradient on one sampled batch, trains only the top `share_fraction` of them and uploads only
  those (A and B). The server averages each module over the clients that sent it (weighted by
  prompts); a module nobody sent keeps its value. Uplink is therefore about
  `share_fraction * global rank / dense rank` of a dense LoRA's (0.25 with the defaults).
- a *personal* LoRA (the other half), trained every round with the user's own reward mix, never
  uploaded; it stays in the client state and the user's private `users/<u>/personal` slot.
- each user is served the exact composition global + personal (`fedpersona.adapters.compose`),
  published to `users/<u>/served` like PFTT's, so the gateway hot-loads and serves it unchanged.

`FedRlhf` (`fedrlhf`) is the dense baseline: one LoRA at the full rank budget, all modules
trained, uploaded and averaged (FedAvg), no personal part; every user is served the one shared
policy. With `reward_mix` set, every client uses that mix instead of its user's.

The lambda_u a client used is reported in its round metrics (`reward-mix`), so it is in every
run record. Local steps are `TrainConfig.steps` RL steps at `TrainConfig.lr`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from fedpersona.adapters.preferences import DEFAULT_REWARD_MIX, reward_mix_problem
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
    TrainConfig,
    adapter_from_params,
    order_seed,
    without_uploads,
)
from fedpersona.trainer.rlhf.sparsity import module_of, sparse_mean, top_modules

if TYPE_CHECKING:
    from fedpersona.adapters import LoraAdapter
    from fedpersona.trainer.learn.lora_train import LoraSession
    from fedpersona.trainer.models.basemodel import ModelInfo

GLOBAL = "global"
PERSONAL = "personal"


def rl_seed(config: TrainConfig, *, round_idx: int, silo: Path) -> int:
    """One client's RL seed for one round: run seed, round and user (`order_seed`'s words).

    RLOO draws its prompt order and its samples from this seed. The run seed alone would replay
    the same prompt batches with the same sampling seeds every round (and leave half of a silo's
    prompts unseen with 12 steps of 2 prompts on 48), so every round would redo round one's data.
    """
    words = order_seed(config, round_idx=round_idx, silo=silo)
    return int(np.random.SeedSequence(list(words)).generate_state(1)[0]) % (2**31)


@dataclass(frozen=True)
class Pfit(LoraMethod):
    """Sparse shared global LoRA + personal LoRA, trained by RLOO on the user's reward mix.

    Runs the shared client template (`LoraMethod`): it loads the session (global from the
    server, personal from the client state) and `finish` does the RL (`TRAINS_ITSELF`).
    """

    spec: LoraSpec = DEFAULT_SPEC
    share_fraction: float = 0.5
    personal: bool = True
    reward_mix: float | None = None  # overrides every user's own mix (a baseline's setting)
    rewards_dir: str | None = None  # default: `<base model dir>/../rewards`
    prompts_per_step: int = 2
    samples: int = 4
    max_new_tokens: int = 24
    kl_coef: float = 0.05
    max_rank: int = DEFAULT_MAX_RANK
    prox_mu: float = 0.0
    personal_round: bool = False
    name: str = "pfit"
    SHARES: ClassVar[Shares] = Shares.GLOBAL_LORA
    SHARED: ClassVar[str | None] = GLOBAL
    KEPT: ClassVar[str | None] = PERSONAL
    TRAINS_ITSELF: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not 0.0 < self.share_fraction <= 1.0:
            raise MethodError(
                f"{self.name}: share_fraction must be in (0, 1], got {self.share_fraction!r}"
            )
        if self.reward_mix is not None and (problem := reward_mix_problem(self.reward_mix)):
            raise MethodError(f"{self.name}: reward_mix {problem}")
        if (
            self.global_spec.rank + (self.personal_spec.rank if self.personal else 0)
            > self.max_rank
        ):
            raise MethodError(f"{self.name}: the served rank exceeds {self.max_rank}")

    @property
    def behaviour(self) -> Behaviour:
        if self.personal:
            return Behaviour(
                shares=self.SHARES,
                publishes=frozenset({Product.GLOBAL, Product.SERVED, Product.PERSONAL}),
                base_role=BaseRole.LARGE,
                rewards=True,
            )
        return Behaviour(
            shares=Shares.LORA,
            publishes=frozenset({Product.GLOBAL, Product.SERVED}),
            base_role=BaseRole.LARGE,
            rewards=True,
        )

    def _part(self, rank: int) -> LoraSpec:
        scaling = self.spec.alpha / self.spec.rank
        return LoraSpec(rank=rank, alpha=scaling * rank, target_modules=self.spec.target_modules)

    @property
    def global_spec(self) -> LoraSpec:
        return self._part(max(1, self.spec.rank // 2) if self.personal else self.spec.rank)

    @property
    def personal_spec(self) -> LoraSpec:
        return self._part(max(1, self.spec.rank - self.spec.rank // 2))

    def loras(self) -> dict[str, LoraSpec]:
        loras = {GLOBAL: self.global_spec}
        if self.personal:
            loras[PERSONAL] = self.personal_spec
        return loras

    def rewards_path(self, base_model: ModelInfo) -> Path:
        from fedpersona.trainer.rlhf.scorer import default_rewards_dir

        return Path(self.rewards_dir) if self.rewards_dir else default_rewards_dir(base_model.path)

    def init_global(self, *, base_model: ModelInfo, seed: int) -> Params:
        from fedpersona.trainer.learn.lora_train import LoraSession

        return LoraSession(base_model, self.loras(), seed=seed).read(GLOBAL)

    def user_reward_mix(self, config: TrainConfig) -> float:
        """The mix a client trains with: ours if set (a baseline's), else the user's own."""
        if self.reward_mix is not None:
            return self.reward_mix
        return DEFAULT_REWARD_MIX if config.reward_mix is None else config.reward_mix

    def prepare(
        self, session: LoraSession, *, global_params: Params, state: Params, final: bool
    ) -> None:
        session.write(GLOBAL, global_params)
        if self.personal and state:
            session.write(PERSONAL, state)

    def finish(self, local: LocalRound) -> LocalResult:
        """RL on the session the template loaded: select the shared modules, then RLOO."""
        # Imported here: torch and the reward models load only where a client trains.
        from fedpersona.trainer.rlhf.mix import mixed_reward
        from fedpersona.trainer.rlhf.rloo import RlConfig, RlooTrainer, load_prompts
        from fedpersona.trainer.rlhf.scorer import RewardPair

        lam = self.user_reward_mix(local.config)
        rewards = RewardPair.load(self.rewards_path(local.base_model))
        seen: dict[str, list[float]] = {"helpfulness": [], "safety": []}

        def reward(prompts: list[str], completions: list[str]) -> np.ndarray:
            scores = rewards.score(prompts, completions)
            seen["helpfulness"].extend(scores.helpfulness.tolist())
            seen["safety"].extend(scores.safety.tolist())
            return mixed_reward(scores.helpfulness, scores.safety, lam)

        session, config = local.session, local.config
        prompts = load_prompts(local.silo, "train")
        rl = RlConfig(
            steps=config.steps,
            lr=config.lr,
            seed=rl_seed(config, round_idx=local.round_idx, silo=local.silo),
            prompts_per_step=self.prompts_per_step,
            samples=self.samples,
            max_new_tokens=self.max_new_tokens,
            kl_coef=self.kl_coef,
        )
        modules = {module_of(k) for k in session.parameters(GLOBAL)}
        shared = frozenset(modules)
        if self.share_fraction < 1.0:
            probe = RlooTrainer(
                session,
                prompts,
                reward=reward,
                config=dataclasses.replace(rl, seed=rl.seed + 1),
                trainable={GLOBAL: None},
            )
            shared = top_modules(probe.module_importance(GLOBAL), self.share_fraction)
        for scores in seen.values():  # the selection's probe is not training
            scores.clear()
        trainable: dict[str, Callable[[str], bool] | None] = {
            GLOBAL: lambda key: module_of(key) in shared
        }
        if self.personal:
            trainable[PERSONAL] = None
        trainer = RlooTrainer(session, prompts, reward=reward, config=rl, trainable=trainable)
        trainer.run()
        trained = session.read(GLOBAL)
        personal = session.read(PERSONAL) if self.personal else {}
        return LocalResult(
            upload={k: v for k, v in trained.items() if module_of(k) in shared},
            state=personal,
            served=self.served_adapter(
                base_model=local.base_model, global_params=trained, state=personal
            ),
            metrics={
                **trainer.metrics(),
                "reward_mix": lam,
                "reward_helpfulness": float(np.mean(seen["helpfulness"])),
                "reward_safety": float(np.mean(seen["safety"])),
                "shared_modules": float(len(shared)),
                "global_modules": float(len(modules)),
            },
        )

    def aggregate(self, *, previous: Params, results: list[tuple[Params, int]]) -> Params:
        if without_uploads(results):
            return dict(previous)
        return sparse_mean(previous, results)

    def served_adapter(
        self, *, base_model: ModelInfo, global_params: Params, state: Params
    ) -> LoraAdapter:
        shared = adapter_from_params(
            global_params, spec=self.global_spec, base_model=base_model.name
        )
        if not self.personal or not state:
            return shared
        from fedpersona.adapters import compose

        return compose(shared, self.personal_adapter(base_model=base_model, state=state))

    def personal_adapter(self, *, base_model: ModelInfo, state: Params) -> LoraAdapter:
        if not self.personal or not state:
            raise MethodError(f"{self.name}: this user has no personal LoRA yet")
        return adapter_from_params(state, spec=self.personal_spec, base_model=base_model.name)


@dataclass(frozen=True)
class FedRlhf(Pfit):
    """Dense federated RLHF: one LoRA, every module trained, uploaded and averaged."""

    share_fraction: float = 1.0
    personal: bool = False
    name: str = "fedrlhf"
    KEPT: ClassVar[str | None] = None
