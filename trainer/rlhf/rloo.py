"""RLOO (REINFORCE leave-one-out) with a KL penalty to the base model, on a `LoraSession`'s LoRAs.

One step, for each of `prompts_per_step` prompts of the user's silo: sample `samples` completions
from the policy (the base model with all the session's LoRAs active), score each with `reward`
(the client's mixed reward, from its reward models), subtract `kl_coef` times the sequence's
KL estimate to the reference (the base model with the adapters disabled:
`sum_t log pi(y_t) - log pi_ref(y_t)` over the sampled tokens), and push up the log-probability of
each completion by its leave-one-out advantage `R_i - mean_{j != i} R_j` (Ahmadian et al., 2024:
"Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback").
Adam on the chosen LoRA keys only (`trainable`: adapter -> key predicate), gradient clipping 1.0.

`module_importance` scores every LoRA module of an adapter by the norm of the policy gradient of
one sampled batch (PFIT picks the modules it trains and shares from it).

Deterministic: sampling is seeded per step from `RlConfig.seed` (torch's global generator is
forked, so callers' random state is left alone) and prompts are drawn in a seeded order. This
module knows nothing about federated rounds, reward mixes or which method runs it.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fedpersona.trainer.data.silo import Message, batch_order, read_chats, silo_file
from fedpersona.trainer.errors import DataError, MethodError
from fedpersona.trainer.learn.lora_train import LoraSession
from fedpersona.trainer.rlhf.sparsity import module_of

# (prompt texts, completion texts) -> one reward per completion
RewardFn = Callable[[list[str], list[str]], np.ndarray]
Prompt = list[Message]


@dataclass(frozen=True)
class RlConfig:
    """One client's local RL."""

    steps: int
    lr: float
    seed: int
    prompts_per_step: int = 2
    samples: int = 4
    max_new_tokens: int = 24
    kl_coef: float = 0.05
    temperature: float = 1.0

    def __post_init__(self) -> None:
        for name in ("steps", "prompts_per_step", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MethodError(f"RlConfig.{name} must be a positive integer, got {value!r}")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 2:
            raise MethodError(
                f"RlConfig.samples must be at least 2 (leave-one-out), got {self.samples!r}"
            )
        if not self.lr > 0 or not self.temperature > 0:
            raise MethodError("RlConfig.lr and temperature must be positive")
        if not self.kl_coef >= 0:
            raise MethodError(f"RlConfig.kl_coef must be >= 0, got {self.kl_coef!r}")


def load_prompts(silo: Path, split: str) -> list[Prompt]:
    """Every chat of a silo split cut before its last assistant reply (what the user asked)."""
    prompts = []
    for chat in read_chats(silo_file(silo, split)):
        last = max(i for i, m in enumerate(chat) if m["role"] == "assistant")
        if last > 0:
            prompts.append(chat[:last])
    if not prompts:
        raise DataError(f"{silo_file(silo, split)}: no chat with a prompt before a reply")
    return prompts


def prompt_text(prompt: Prompt) -> str:
    """What a reward model sees as the prompt: the last user message."""
    return next(m["content"] for m in reversed(prompt) if m["role"] == "user")


@dataclass
class Rollout:
    """Samples of one prompt: ids, mask of the completion tokens, rewards, KL."""

    input_ids: torch.Tensor  # [n, prompt + completion]
    completion_mask: torch.Tensor  # [n, prompt + completion], 1 on sampled tokens up to eos
    prompt_len: int
    texts: list[str]


def leave_one_out(rewards: torch.Tensor) -> torch.Tensor:
    """RLOO advantages of one prompt's samples: `R_i - mean_{j != i} R_j` (they sum to 0)."""
    n = rewards.shape[0]
    if n < 2:
        raise MethodError("leave-one-out needs at least two samples")
    return rewards - (rewards.sum() - rewards) / (n - 1)


def prompt_ids(tokenizer: Any, prompt: Prompt) -> torch.Tensor:
    """The prompt rendered with the policy's chat template plus the generation prompt."""
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    ids: torch.Tensor = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return ids


def sample(
    model: Any,
    tokenizer: Any,
    prompt: Prompt,
    *,
    n: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
) -> Rollout:
    """`n` sampled completions of `prompt` (plain sampling, seeded), cut after the first eos."""
    ids = prompt_ids(tokenizer, prompt)
    length = ids.shape[1]
    eos = int(tokenizer.eos_token_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    model.eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=ids.repeat(n, 1),
            attention_mask=torch.ones((n, length), dtype=torch.long),
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            pad_token_id=int(pad),
            eos_token_id=eos,
        )
    completion = out[:, length:]
    is_eos = (completion == eos).long()
    keep = ((torch.cumsum(is_eos, dim=1) - is_eos) == 0).long()  # up to and including eos
    mask = torch.cat([torch.zeros((n, length), dtype=torch.long), keep], dim=1)
    texts = [
        tokenizer.decode(row[row_keep.bool()], skip_special_tokens=True).strip()
        for row, row_keep in zip(completion, keep, strict=True)
    ]
    return Rollout(input_ids=out, completion_mask=mask, prompt_len=length, texts=texts)


def _logits(model: Any, rollout: Rollout, *, reference: bool) -> torch.Tensor:
    attention = torch.ones_like(rollout.input_ids)
    attention[:, rollout.prompt_len :] = rollout.completion_mask[:, rollout.prompt_len :]
    if reference:
        with torch.no_grad(), model.disable_adapter():
            return model(input_ids=rollout.input_ids, attention_mask=attention).logits[:, :-1]
    logits: torch.Tensor = model(input_ids=rollout.input_ids, attention_mask=attention).logits
    return logits[:, :-1]


def sequence_logprobs(model: Any, rollout: Rollout, *, reference: bool = False) -> torch.Tensor:
    """Per completion, the sum of its tokens' log-probabilities (policy, or the reference: the
    same PEFT model with its adapters disabled)."""
    logp = torch.log_softmax(_logits(model, rollout, reference=reference).float(), dim=-1)
    token_logp = logp.gather(-1, rollout.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (token_logp * rollout.completion_mask[:, 1:]).sum(dim=1)


def exact_kl(model: Any, rollout: Rollout) -> torch.Tensor:
    """Per completion, `sum_t KL(pi(.|y_<t) || pi_ref(.|y_<t))` over its tokens: the full
    next-token distributions along the sampled path (never negative, unlike the sample
    estimate the training penalty uses)."""
    with torch.no_grad():
        logp = torch.log_softmax(_logits(model, rollout, reference=False).float(), dim=-1)
        ref = torch.log_softmax(_logits(model, rollout, reference=True).float(), dim=-1)
        per_token = (logp.exp() * (logp - ref)).sum(dim=-1)
    return (per_token * rollout.completion_mask[:, 1:]).sum(dim=1)


class RlooTrainer:
    def __init__(
        self,
        session: LoraSession,
        prompts: Sequence[Prompt],
        *,
        reward: RewardFn,
        config: RlConfig,
        trainable: Mapping[str, Callable[[str], bool] | None],
    ) -> None:
        if not prompts:
            raise DataError("RL needs at least one prompt")
        self.session = session
        self.prompts = list(prompts)
        self.reward = reward
        self.config = config
        self._params = [
            p
            for name, keep in trainable.items()
            for key, p in session.parameters(name).items()
            if keep is None or keep(key)
        ]
        for name in session.specs:
            for param in session.parameters(name).values():
                param.requires_grad_(False)
        if not self._params:
            raise MethodError(f"nothing to train in adapters {list(trainable)}")
        for param in self._params:
            param.requires_grad_(True)
        self._optimizer = torch.optim.Adam(self._params, lr=config.lr)
        self._order = batch_order(
            len(self.prompts), batch_size=config.prompts_per_step, seed=(config.seed, 7)
        )
        self._steps_done = 0
        self.history: list[dict[str, float]] = []

    def rollout(self, prompt: Prompt, *, seed: int) -> Rollout:
        """`samples` completions of `prompt` from the current policy."""
        return sample(
            self.session.model,
            self.session.tokenizer,
            prompt,
            n=self.config.samples,
            max_new_tokens=self.config.max_new_tokens,
            temperature=self.config.temperature,
            seed=seed,
        )

    def sequence_logprobs(self, rollout: Rollout, *, reference: bool = False) -> torch.Tensor:
        return sequence_logprobs(self.session.model, rollout, reference=reference)

    # ----------------------------------------------------------------------------- training

    def _loss(self, prompts: Sequence[Prompt], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        self.session.model.train()
        losses, rewards, kls, lengths = [], [], [], []
        for i, prompt in enumerate(prompts):
            words = [self.config.seed, 0 if step < 0 else 1, max(step, 0), i]
            seed = int(np.random.SeedSequence(words).generate_state(1)[0]) % (2**31)
            rollout = self.rollout(prompt, seed=seed)
            scores = np.asarray(
                self.reward([prompt_text(prompt)] * len(rollout.texts), rollout.texts),
                dtype=np.float64,
            )
            policy = self.sequence_logprobs(rollout)
            reference = self.sequence_logprobs(rollout, reference=True)
            kl = (policy.detach() - reference).double()
            shaped = torch.from_numpy(scores) - self.config.kl_coef * kl
            advantage = leave_one_out(shaped).float()
            losses.append(-(advantage * policy).mean() / self.config.max_new_tokens)
            rewards.extend(scores.tolist())
            kls.extend(kl.tolist())
            lengths.extend(rollout.completion_mask.sum(dim=1).tolist())
        loss = torch.stack(losses).mean()
        metrics = {
            "rl_loss": float(loss.detach()),
            "reward": statistics.fmean(rewards),
            "kl": statistics.fmean(kls),
            "completion_tokens": statistics.fmean(lengths),
        }
        return loss, metrics

    def step(self) -> dict[str, float]:
        indices = next(self._order)
        step = self._steps_done
        loss, metrics = self._loss([self.prompts[i] for i in indices], step)
        self._optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self._params, 1.0)
        self._optimizer.step()
        self._steps_done += 1
        self.history.append(metrics)
        return metrics

    def run(self, steps: int | None = None) -> list[dict[str, float]]:
        return [self.step() for _ in range(self.config.steps if steps is None else steps)]

    def module_importance(self, adapter: str) -> dict[str, float]:
        """Per LoRA module of `adapter`: the L2 norm of the RL loss's gradient on one batch.

        Takes no optimizer step and leaves the weights as they are."""
        params = self.session.parameters(adapter)
        flags = {key: p.requires_grad for key, p in params.items()}
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        loss, _ = self._loss([self.prompts[i] for i in next(self._order)], step=-1)
        loss.backward()
        scores: dict[str, float] = {}
        for key, p in params.items():
            g = 0.0 if p.grad is None else float(p.grad.double().pow(2).sum())
            scores[module_of(key)] = scores.get(module_of(key), 0.0) + g
        for key, p in params.items():
            p.grad = None
            p.requires_grad_(flags[key])
        self._optimizer.zero_grad(set_to_none=True)
        return {module: score**0.5 for module, score in sorted(scores.items())}

    def metrics(self) -> dict[str, float]:
        if not self.history:
            return {}
        first, last = self.history[0], self.history[-1]
        return {
            "train_loss": statistics.fmean(h["rl_loss"] for h in self.history),
            "reward_mean": statistics.fmean(h["reward"] for h in self.history),
            "reward_first": first["reward"],
            "reward_last": last["reward"],
            "kl_last": last["kl"],
            "rl_steps": float(len(self.history)),
            "completion_tokens": statistics.fmean(h["completion_tokens"] for h in self.history),
        }
