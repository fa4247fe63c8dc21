"""Reward models and reward mixes: the preference pairs, the built defaults (real training on the
CPU, held-out accuracy), the scorer on any sequence-classification directory, lambda_u in the
silo and its command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from fedpersona.trainer.errors import RewardModelError
from fedpersona.trainer.rlhf import pairs
from fedpersona.trainer.rlhf.mix import (
    DEFAULT_REWARD_MIX,
    Preferences,
    mixed_reward,
    preferences_path,
    read_preferences,
    write_preferences,
)

from fedpersona.cli import main as cli_main

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


def test_reward_mix_round_trips_through_the_silo(tmp_path: Path) -> None:
    assert read_preferences(tmp_path) == Preferences(DEFAULT_REWARD_MIX)
    write_preferences(tmp_path, Preferences(reward_mix=0.25))
    assert json.loads(preferences_path(tmp_path).read_text()) == {"reward_mix": 0.25}
    assert read_preferences(tmp_path).reward_mix == 0.25


@pytest.mark.parametrize("bad", [-0.01, 1.01, math.nan, math.inf, True, "0.5", None])
def test_a_reward_mix_out_of_range_is_refused(tmp_path: Path, bad: object) -> None:
    with pytest.raises(RewardModelError):
        Preferences(reward_mix=bad)  # type: ignore[arg-type]
    preferences_path(tmp_path).write_text(json.dumps({"reward_mix": bad}))
    with pytest.raises(RewardModelError, match=r"preferences\.json"):
        read_preferences(tmp_path)


def test_a_malformed_preferences_file_is_refused_not_replaced(tmp_path: Path) -> None:
    for text in ("{", "[0.5]", '{"reward_mix": 0.5, "other": 1}'):
        preferences_path(tmp_path).write_text(text)
        with pytest.raises(RewardModelError, match=r"preferences\.json"):
            read_preferences(tmp_path)
        assert preferences_path(tmp_path).read_text() == text


def test_mixed_reward_is_the_convex_combination() -> None:
    h, s = np.array([1.0, -2.0, 0.5]), np.array([0.0, 3.0, 0.5])
    for lam in (0.0, 0.3, 1.0):
        np.testing.assert_allclose(mixed_reward(h, s, lam), lam * h + (1 - lam) * s)


def test_reward_mix_command_sets_shows_and_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "silos" / "alice").mkdir(parents=True)
    home = ["--home", str(tmp_path)]
    assert cli_main(["reward-mix", "alice", "0.8", *home]) == 0
    assert json.loads(capsys.readouterr().out) == {"user": "alice", "reward_mix": 0.8}
    assert cli_main(["reward-mix", "alice", "1.5", *home]) == 2
    assert cli_main(["reward-mix", "alice", *home]) == 0
    assert json.loads(capsys.readouterr().out)["reward_mix"] == 0.8
    assert cli_main(["reward-mix", "../etc", "0.5", *home]) == 2
    assert cli_main(["reward-mix", "nobody", "0.5", *home]) == 2  # no silo: nothing written


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
