"""Reward models: any Hugging Face sequence-classification directory with one output.

`RewardModel(path)` loads `AutoModelForSequenceClassification` + `AutoTokenizer` from a
directory (the defaults `fedpersona models rewards` builds, or a deployment's own) and scores
(prompt, response) exchanges: rendered with the reward model's own chat template when its
tokenizer has one, else as a text pair `(prompt, response)`; truncated from the left, so the
response is kept. If the directory's `fedpersona.json` carries `score_mean` / `score_std` (the
built defaults record them on their training pairs), scores are standardized with them, so the
two rewards a user mixes are on one scale; a foreign directory's raw scores are used as they are.

`RewardPair` is the helpfulness and the safety model of one client, loaded from
`<rewards>/helpfulness` and `<rewards>/safety`. Reward models run only where the client runs
(they read the policy's decoded text, never its weights). Knows nothing about Flower or LoRA.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fedpersona.trainer.errors import RewardModelError
from fedpersona.trainer.rlhf.pairs import OBJECTIVES

MARKER = "fedpersona.json"


def reward_dir(rewards: Path, objective: str) -> Path:
    """Where the reward model of `objective` lives under a rewards directory."""
    if objective not in OBJECTIVES:
        raise RewardModelError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
    return Path(rewards) / objective


def default_rewards_dir(base_model_dir: Path) -> Path:
    """The reward models beside the base models: `<home>/models/rewards`."""
    return Path(base_model_dir).parent / "rewards"


class RewardModel:
    """One reward model directory, scoring (prompt, response) pairs on the CPU."""

    def __init__(self, path: Path, *, max_len: int = 256) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise RewardModelError(f"{path}: not a Hugging Face model directory (no config.json)")
        try:
            self.tokenizer: Any = AutoTokenizer.from_pretrained(str(path))
            self.model: Any = AutoModelForSequenceClassification.from_pretrained(
                str(path), dtype=torch.float32
            )
        except (OSError, ValueError, KeyError) as e:
            raise RewardModelError(f"{path}: cannot load a sequence classifier: {e}") from e
        if int(self.model.config.num_labels) != 1:
            raise RewardModelError(
                f"{path}: a reward model has one output, "
                f"this one has {self.model.config.num_labels}"
            )
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.truncation_side = "left"
        self.model.requires_grad_(False)
        self.model.eval()
        self.path = path
        self.max_len = max_len
        self.mean, self.std = _normalization(path)

    def _encode(self, prompts: Sequence[str], responses: Sequence[str]) -> Any:
        kwargs = {"truncation": True, "max_length": self.max_len, "padding": True}
        if getattr(self.tokenizer, "chat_template", None):
            texts = [
                render_exchange(self.tokenizer, p, r)
                for p, r in zip(prompts, responses, strict=True)
            ]
            return self.tokenizer(texts, add_special_tokens=False, return_tensors="pt", **kwargs)
        return self.tokenizer(list(prompts), list(responses), return_tensors="pt", **kwargs)

    def raw_scores(
        self, prompts: Sequence[str], responses: Sequence[str], *, batch_size: int = 32
    ) -> np.ndarray:
        """The model's output per exchange, before standardization."""
        if len(prompts) != len(responses):
            raise RewardModelError("prompts and responses differ in number")
        out: list[np.ndarray] = []
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                batch = self._encode(
                    prompts[start : start + batch_size], responses[start : start + batch_size]
                )
                logits = self.model(**batch).logits[:, 0]
                out.append(logits.double().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    def score(
        self, prompts: Sequence[str], responses: Sequence[str], *, batch_size: int = 32
    ) -> np.ndarray:
        """Standardized scores (raw ones for a directory without normalization)."""
        raw = self.raw_scores(prompts, responses, batch_size=batch_size)
        return (raw - self.mean) / self.std


def render_exchange(tokenizer: Any, prompt: str, response: str) -> str:
    """One user turn and one assistant reply in the reward model's chat format."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
        tokenize=False,
    )
    if not isinstance(text, str):
        raise RewardModelError("the reward model's chat template did not render text")
    return text


def _normalization(path: Path) -> tuple[float, float]:
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return 0.0, 1.0
    mean, std = marker.get("score_mean"), marker.get("score_std")
    if isinstance(mean, int | float) and isinstance(std, int | float) and std > 0:
        return float(mean), float(std)
    return 0.0, 1.0


@dataclass(frozen=True)
class RewardScores:
    helpfulness: np.ndarray
    safety: np.ndarray


class RewardPair:
    """The helpfulness and safety reward models of one client."""

    def __init__(self, helpfulness: RewardModel, safety: RewardModel) -> None:
        self.helpfulness = helpfulness
        self.safety = safety

    @classmethod
    def load(cls, rewards: Path) -> RewardPair:
        return _cached_pair(str(Path(rewards).resolve()), _identity(Path(rewards)))

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> RewardScores:
        return RewardScores(
            helpfulness=self.helpfulness.score(prompts, responses),
            safety=self.safety.score(prompts, responses),
        )


def _identity(rewards: Path) -> tuple[int, ...]:
    # A rebuilt reward model (new files) is not paired with a stale cached one.
    stamps = []
    for objective in OBJECTIVES:
        config = reward_dir(rewards, objective) / "config.json"
        try:
            stamps.append(config.stat().st_mtime_ns)
        except FileNotFoundError as e:
            raise RewardModelError(
                f"{config.parent}: no reward model (build the defaults with "
                "`fedpersona models rewards`)"
            ) from e
    return tuple(stamps)


@functools.lru_cache(maxsize=2)
def _cached_pair(rewards: str, identity: tuple[int, ...]) -> RewardPair:
    return RewardPair(
        RewardModel(reward_dir(Path(rewards), "helpfulness")),
        RewardModel(reward_dir(Path(rewards), "safety")),
    )
