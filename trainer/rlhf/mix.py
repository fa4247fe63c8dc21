"""A user's reward mix lambda_u and the mixed reward; kept in the user's silo.

`<silo>/preferences.json` holds `{"reward_mix": lambda_u}` with lambda_u in [0, 1]: the user's
reward is `lambda_u * r_helpfulness + (1 - lambda_u) * r_safety`. The silo is where the trainer
reads a user's data (on a device or silo machine it is that machine's directory), so the mix
travels with the data and never through a Flower message. A silo without the file uses
`DEFAULT_REWARD_MIX`. The file is written atomically; a malformed file or a value out of range
is refused with `RewardModelError` naming the file, never silently replaced.

This module knows nothing about models, the service or Flower.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fedpersona.trainer.errors import RewardModelError

PREFERENCES_FILE = "preferences.json"
DEFAULT_REWARD_MIX = 0.5


def check_reward_mix(value: object, *, where: str = "reward_mix") -> float:
    """`value` as a float in [0, 1]; `RewardModelError` naming `where` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RewardModelError(f"{where} must be a number in [0, 1], got {value!r}")
    number = float(value)
    if not math.isfinite(number) or not 0.0 <= number <= 1.0:
        raise RewardModelError(f"{where} must be in [0, 1], got {value!r}")
    return number


@dataclass(frozen=True)
class Preferences:
    """What a user chose about their rewards."""

    reward_mix: float = DEFAULT_REWARD_MIX

    def __post_init__(self) -> None:
        object.__setattr__(self, "reward_mix", check_reward_mix(self.reward_mix))


def preferences_path(silo: Path) -> Path:
    return Path(silo) / PREFERENCES_FILE


def read_preferences(silo: Path) -> Preferences:
    """The user's preferences; the defaults when the silo has no preferences file."""
    path = preferences_path(silo)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Preferences()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RewardModelError(f"{path}: not a readable JSON file: {e}") from e
    if not isinstance(data, dict) or set(data) - {"reward_mix"}:
        raise RewardModelError(f'{path}: expected {{"reward_mix": <0..1>}}, got {data!r}')
    return Preferences(
        reward_mix=check_reward_mix(
            data.get("reward_mix", DEFAULT_REWARD_MIX), where=f"{path}: reward_mix"
        )
    )


def write_preferences(silo: Path, preferences: Preferences) -> Path:
    """Write the preferences file atomically (temporary file, fsync, rename)."""
    path = preferences_path(silo)
    if not Path(silo).is_dir():
        raise RewardModelError(f"{silo}: no such silo directory")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"reward_mix": preferences.reward_mix}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def mixed_reward(helpfulness: np.ndarray, safety: np.ndarray, reward_mix: float) -> np.ndarray:
    """`reward_mix * helpfulness + (1 - reward_mix) * safety`, elementwise."""
    lam = check_reward_mix(reward_mix)
    return lam * np.asarray(helpfulness, dtype=np.float64) + (1.0 - lam) * np.asarray(
        safety, dtype=np.float64
    )
