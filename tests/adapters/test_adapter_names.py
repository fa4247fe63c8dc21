"""User ids and slot paths: valid names round-trip, everything else is refused."""

from __future__ import annotations

import re

import pytest
from fedpersona.adapters import InvalidName, Slot, SlotKind, validate_user_id
from hypothesis import given
from hypothesis import strategies as st

USER_RE = r"[a-z0-9][a-z0-9_-]{0,62}"


@given(st.from_regex(USER_RE, fullmatch=True))
def test_every_id_matching_the_contract_is_accepted(user: str) -> None:
    assert validate_user_id(user) == user
    for slot in (Slot.user_served(user), Slot.user_personal(user), Slot.user_expert(user)):
        assert slot.user == user
        assert Slot.parse(slot.path) == slot


@given(st.text(max_size=80))
def test_ids_not_matching_the_contract_are_refused(text: str) -> None:
    if re.fullmatch(USER_RE, text):
        assert validate_user_id(text) == text
    else:
        with pytest.raises(InvalidName, match="invalid user id"):
            validate_user_id(text)


@pytest.mark.parametrize(
    "bad",
    ["", "Alice", "-alice", "_a", "a" * 64, "al ice", "al/ice", "..", ".", "alice\n", "ålice"],
)
def test_specific_bad_ids(bad: str) -> None:
    with pytest.raises(InvalidName):
        validate_user_id(bad)
    with pytest.raises(InvalidName):
        Slot.user_served(bad)


def test_non_string_id_is_refused() -> None:
    with pytest.raises(InvalidName, match="must be a string"):
        validate_user_id(3)  # type: ignore[arg-type]


def test_slot_paths() -> None:
    assert Slot.user_served("alice").path == "users/alice/served"
    assert Slot.user_personal("alice").path == "users/alice/personal"
    assert Slot.user_expert("alice").path == "users/alice/expert"
    assert Slot.global_adapter("pftt").path == "global/adapters/pftt"
    assert Slot.global_expert().path == "global/expert"
    assert Slot.global_adapter("pftt").user is None
    assert Slot.global_expert().user is None
    assert str(Slot.user_served("bob")) == "users/bob/served"


def test_every_constructor_round_trips_through_parse() -> None:
    slots = [
        Slot.user_served("a"),
        Slot.user_personal("a-b_c"),
        Slot.user_expert("0"),
        Slot.global_adapter("fedavg"),
        Slot.global_expert(),
    ]
    for slot in slots:
        assert Slot.parse(slot.path) == slot
    assert {s.kind for s in slots} == set(SlotKind)


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/users/alice/served",
        "users/alice/served/",
        "users//served",
        "users/../served",
        "users/alice/../bob/served",
        "users/alice/other",
        "users/Alice/served",
        "users/alice",
        "global",
        "global/adapters",
        "global/adapters/../x",
        "global/expert/x",
        "global/adapters/a/b",
        "experts/global",
        "users\\alice\\served",
        "users/alice/served\x00",
    ],
)
def test_parse_refuses_anything_else(path: str) -> None:
    with pytest.raises(InvalidName):
        Slot.parse(path)


@given(st.text(alphabet="abc./_-\\ ", max_size=30))
def test_parse_accepts_only_canonical_paths(path: str) -> None:
    try:
        slot = Slot.parse(path)
    except InvalidName:
        return
    assert slot.path == path
    assert ".." not in path.split("/")


def test_slot_fields_are_checked_on_direct_construction() -> None:
    with pytest.raises(InvalidName):
        Slot(SlotKind.USER_SERVED, "../x")
    with pytest.raises(InvalidName):
        Slot(SlotKind.GLOBAL_EXPERT, "x")
    with pytest.raises(InvalidName):
        Slot("served", "alice")  # type: ignore[arg-type]
