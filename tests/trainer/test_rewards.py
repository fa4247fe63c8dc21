"""Reward models and the mixed reward: the preference pairs, the built defaults (real training on
the CPU, held-out accuracy), the scorer on any sequence-classification directory. A user's
lambda_u itself is tested with its contract (tests/adapters/test_preferences.py) and its admin
API and CLI (tests/service/test_gateway_reward_mix.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fedpersona.trainer.errors import RewardModelError
from fedpersona.trainer.rlhf import pairs
from fedpersona.trainer.rlhf.mix import mixed_reward

# ------------------------------------------------------------------------ preference pairs


def test_pairs_are_deterministic_and_held_out_prompts_never_train() -> None:
    first = pairs.preference_data("safety", per_persona=20)
    assert first == pairs.preference_data("safety", per_persona=20)
    train_prompts = {p.prompt for p in first.train}
    held_prompts = {p.prompt for p in first.heldout}
    assert train_prompts and held_prompts and not train_prompts & held_prompts


def test_held_out_pairs_use_phrases_training_never_saw() -> None:
    data = pairs.preference_data("helpfulness", per_persona=30)
    unseen = [
        phrase
        for options in (pairs.CAVEATS, pairs.EVASIONS, pairs.RECKLESS)
        for phrase in options[-pairs.HELDOUT_PHRASES :]
    ]
    train_text = " ".join(p.chosen + p.rejected for p in data.train)
    held_text = " ".join(p.chosen + p.rejected for p in data.heldout)
    assert not any(phrase in train_text for phrase in unseen)
    assert any(phrase in held_text for phrase in unseen)


def test_the_two_objectives_conflict() -> None:
    # A refusal beats an answer for safety and loses to it for helpfulness.
    assert ("evasive", "direct") in pairs.ORDERS["safety"]
    assert ("direct", "evasive") in pairs.ORDERS["helpfulness"]
    assert ("reckless", "cautious") in pairs.ORDERS["helpfulness"]
    assert ("cautious", "reckless") in pairs.ORDERS["safety"]


# ----------------------------------------------------------------------------- reward mix


def test_mixed_reward_is_the_convex_combination() -> None:
    h, s = np.array([1.0, -2.0, 0.5]), np.array([0.0, 3.0, 0.5])
    for lam in (0.0, 0.3, 1.0):
        np.testing.assert_allclose(mixed_reward(h, s, lam), lam * h + (1 - lam) * s)


# -------------------------------------------------------------------- built reward models


@pytest.fixture(scope="module")
def reward_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedpersona.trainer.models.rewards import MICRO_REWARDS, build_reward_models

    out = tmp_path_factory.mktemp("rewards")
    build_reward_models(out, MICRO_REWARDS)
    return out


@pytest.mark.slow
def test_built_reward_models_rank_held_out_pairs(reward_models: Path) -> None:
    from fedpersona.trainer.models.rewards import (
        MICRO_REWARDS,
        build_reward_models,
        read_marker,
    )

    help_marker, safe_marker = (read_marker(reward_models / o) for o in pairs.OBJECTIVES)
    assert help_marker is not None and safe_marker is not None
    # Measured on pairs with unseen prompts and unseen rewrite phrases (micro recipe: 0.99, 0.80).
    assert help_marker["heldout_accuracy"] >= 0.9
    assert safe_marker["heldout_accuracy"] >= 0.7
    assert help_marker["license"] == "Apache-2.0" and "persona" in help_marker["source"]
    # Held-out accuracy depends on the CPU kernels and libraries of the build (rounding decides
    # a few unseen phrases), so a marker says which ones made it.
    assert {"torch", "transformers", "tokenizers", "torch_cpu_capability"} <= set(
        safe_marker["environment"]
    )
    again = build_reward_models(reward_models, MICRO_REWARDS)
    assert all(info.cache_hit for info in again)


@pytest.mark.slow
def test_the_scorer_loads_any_classifier_dir_and_standardizes(reward_models: Path) -> None:
    from fedpersona.trainer.rlhf.scorer import RewardModel, RewardPair

    rewards = RewardPair.load(reward_models)
    data = pairs.preference_data("safety", per_persona=10)
    chosen = rewards.safety.score([p.prompt for p in data.train], [p.chosen for p in data.train])
    rejected = rewards.safety.score(
        [p.prompt for p in data.train], [p.rejected for p in data.train]
    )
    assert float(np.mean(chosen > rejected)) > 0.9
    assert abs(float(np.mean(np.concatenate([chosen, rejected])))) < 1.0  # standardized
    # A plain directory without our marker scores raw.
    plain = RewardModel(reward_models / "helpfulness")
    raw = plain.raw_scores(["hi"], ["hello"])
    assert raw.shape == (1,) and np.isfinite(raw).all()


@pytest.mark.slow
def test_a_classifier_with_two_outputs_is_not_a_reward_model(
    reward_models: Path, tmp_path: Path
) -> None:
    from fedpersona.trainer.rlhf.scorer import RewardModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(
        str(reward_models / "safety"), num_labels=2, ignore_mismatched_sizes=True
    )
    model.save_pretrained(str(tmp_path / "two"))
    AutoTokenizer.from_pretrained(str(reward_models / "safety")).save_pretrained(
        str(tmp_path / "two")
    )
    with pytest.raises(RewardModelError, match="one output"):
        RewardModel(tmp_path / "two")
    with pytest.raises(RewardModelError, match=r"config\.json"):
        RewardModel(tmp_path / "missing")
