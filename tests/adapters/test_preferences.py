"""A user's preferences in the store: format, range, place, atomic replace, and that deleting a
user takes them along (`fedpersona.adapters.preferences`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from fedpersona.adapters import AdapterStore, InvalidName, Slot
from fedpersona.adapters.errors import InvalidPreferences
from fedpersona.adapters.preferences import (
    DEFAULT_REWARD_MIX,
    Preferences,
    check_reward_mix,
    effective_preferences,
    preferences_path,
    read_preferences,
    reward_mix_problem,
    write_preferences,
)
from support.lora import random_lora

BAD = [-0.01, 1.01, math.nan, math.inf, -math.inf, True, "0.5", None]


def test_unset_reads_none_and_the_effective_mix_is_the_default(tmp_path: Path) -> None:
    assert read_preferences(tmp_path, "alice") is None
    assert effective_preferences(tmp_path, "alice") == Preferences(DEFAULT_REWARD_MIX)
    assert not (tmp_path / "slots").exists()  # reading creates nothing


def test_round_trip_beside_the_users_slots(tmp_path: Path) -> None:
    path = write_preferences(tmp_path, "alice", Preferences(reward_mix=0.25))
    store = AdapterStore(tmp_path)
    assert (
        path == store.user_dir("alice") / "preferences.json" == preferences_path(tmp_path, "alice")
    )
    assert json.loads(path.read_text()) == {"reward_mix": 0.25}
    assert read_preferences(tmp_path, "alice") == Preferences(0.25)
    write_preferences(tmp_path, "alice", Preferences(reward_mix=1))
    assert read_preferences(tmp_path, "alice") == Preferences(1.0)
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert store.slots() == [] and store.users() == []  # not a slot, not a published user


@pytest.mark.parametrize("bad", BAD)
def test_a_reward_mix_out_of_range_or_of_another_type_is_refused(
    tmp_path: Path, bad: object
) -> None:
    assert reward_mix_problem(bad) is not None
    with pytest.raises(InvalidPreferences, match="from 0 to 1"):
        Preferences(reward_mix=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^lambda must be"):
        check_reward_mix(bad, where="lambda")
    path = preferences_path(tmp_path, "alice")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"reward_mix": bad}))
    with pytest.raises(InvalidPreferences, match=r"preferences\.json: reward_mix"):
        read_preferences(tmp_path, "alice")


def test_the_range_ends_are_accepted() -> None:
    assert [check_reward_mix(v) for v in (0, 0.0, 0.5, 1)] == [0.0, 0.0, 0.5, 1.0]


def test_a_malformed_file_is_refused_never_replaced_by_the_default(tmp_path: Path) -> None:
    path = preferences_path(tmp_path, "alice")
    path.parent.mkdir(parents=True)
    for text in ("{", "[0.5]", '{"reward_mix": 0.5, "other": 1}', "\xff"):
        path.write_text(text, encoding="latin-1")
        with pytest.raises(InvalidPreferences, match=r"preferences\.json"):
            effective_preferences(tmp_path, "alice")
        assert path.read_text(encoding="latin-1") == text


@pytest.mark.parametrize("name", ["../etc", "Alice", "", "a/b"])
def test_a_bad_user_name_never_becomes_a_path(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidName):
        write_preferences(tmp_path, name, Preferences(0.5))
    with pytest.raises(InvalidName):
        read_preferences(tmp_path, name)
    assert not (tmp_path / "slots").exists()


def test_quarantining_a_user_takes_their_preferences_along(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    store.publish_lora(
        Slot.user_served("alice"), random_lora(seed=0, r=2, targets=("q_proj",), layers=(0,))
    )
    write_preferences(tmp_path, "alice", Preferences(0.9))
    write_preferences(tmp_path, "bob", Preferences(0.1))  # preferences only, no slot yet
    moved = store.quarantine_user("alice", label="u0123")
    assert moved.path is not None and (moved.path / "preferences.json").is_file()
    assert read_preferences(tmp_path, "alice") is None  # a reused name starts from the default
    gone = store.quarantine_user("bob", label="u4567")
    assert gone.slots == () and gone.path is not None
    assert read_preferences(tmp_path, "bob") is None
