"""A user's training preferences: the reward mix lambda_u of PFIT, where it is kept and checked.

The gateway writes it (`PATCH /admin/users/{name}`, `fedpersona users reward-mix`) and the
trainer's clients read it each round, so its format, range and place belong to the contract
between them. It lives in the adapter store, beside the user's slots:

    <store>/slots/users/<user>/preferences.json     {"reward_mix": <0..1>}

The store is the one place both sides see in every deployment (the gateway publishes nothing
but mounts it; every Flower client, simulated or on a SuperNode, already publishes its personal
LoRA there). Keeping the file in the user's slot directory means deleting a user quarantines
their preferences with their adapters, and a reused name starts from the defaults.

A user's reward is `lambda_u * r_helpfulness + (1 - lambda_u) * r_safety`; a user who never set
lambda_u gets `DEFAULT_REWARD_MIX`. Writes are atomic (temporary file, fsync, rename). A
malformed file or a value out of range is refused with `InvalidPreferences` naming the file,
never silently replaced by the default. This module knows nothing about reward models, HTTP or
Flower.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from fedpersona.adapters.durable import ensure_dir, write_json_atomic
from fedpersona.adapters.errors import InvalidPreferences
from fedpersona.adapters.store import AdapterStore

PREFERENCES_FILE = "preferences.json"
REWARD_MIX_MIN = 0.0
REWARD_MIX_MAX = 1.0
DEFAULT_REWARD_MIX = 0.5
_FIELDS = frozenset({"reward_mix"})


def reward_mix_problem(value: object) -> str | None:
    """Why `value` is not an accepted reward mix (a sentence without a subject), or None."""
    accepted = f"a number from {REWARD_MIX_MIN:g} to {REWARD_MIX_MAX:g}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"must be {accepted}"
    if not math.isfinite(value) or not REWARD_MIX_MIN <= value <= REWARD_MIX_MAX:
        return f"must be {accepted}, got {value:g}"
    return None


def check_reward_mix(value: object, *, where: str = "reward_mix") -> float:
    """`value` as a float if it is an accepted reward mix; else `InvalidPreferences` (`where`)."""
    problem = reward_mix_problem(value)
    if problem is not None:
        raise InvalidPreferences(f"{where} {problem}")
    return float(value)  # type: ignore[arg-type]  # checked above: an int or a float


@dataclass(frozen=True)
class Preferences:
    """What a user chose about their training; validated on construction."""

    reward_mix: float = DEFAULT_REWARD_MIX

    def __post_init__(self) -> None:
        object.__setattr__(self, "reward_mix", check_reward_mix(self.reward_mix))

    def to_json(self) -> dict[str, float]:
        return {"reward_mix": self.reward_mix}


def preferences_path(store_root: Path, user: str) -> Path:
    """Where `user`'s preferences file lives below the store root (`user` is validated)."""
    return AdapterStore(store_root, read_only=True).user_dir(user) / PREFERENCES_FILE


def parse_preferences(data: object, *, where: str) -> Preferences:
    """`Preferences` from the decoded JSON of a preferences file; `where` names the source."""
    if not isinstance(data, dict) or set(data) - _FIELDS:
        raise InvalidPreferences(f'{where}: expected {{"reward_mix": <0..1>}}, got {data!r}')
    value = data.get("reward_mix", DEFAULT_REWARD_MIX)
    return Preferences(reward_mix=check_reward_mix(value, where=f"{where}: reward_mix"))


def read_preferences(store_root: Path, user: str) -> Preferences | None:
    """`user`'s preferences as last written, or None if they never set any."""
    path = preferences_path(store_root, user)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidPreferences(f"{path}: not readable: {e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidPreferences(f"{path}: not a JSON file: {e}") from e
    return parse_preferences(data, where=str(path))


def effective_preferences(store_root: Path, user: str) -> Preferences:
    """`user`'s preferences, or the defaults if they never set any."""
    return read_preferences(store_root, user) or Preferences()


def write_preferences(store_root: Path, user: str, preferences: Preferences) -> Path:
    """Replace `user`'s preferences atomically; return the file written.

    Creates the user's directory below the store root if they have no slot yet. Only the
    gateway (and the operator's CLI) writes here; the trainer only reads. This does not know
    whether `user` still exists: a writer that can race deleting them orders the two (the gateway
    writes under its registry's lock, with the user present), or a deleted user's directory
    could be created again after its quarantine.
    """
    path = preferences_path(store_root, user)
    ensure_dir(path.parent)
    write_json_atomic(path, preferences.to_json())
    return path
