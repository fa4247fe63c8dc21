"""The benchmark's data: the validation split never touches held-out chats; the pydocs
population keeps every user's text out of every other user's silo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fedpersona.trainer.data import personas, pydocs
from fedpersona.trainer.data.validation import carve, split_lines
from fedpersona.trainer.errors import DataError


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line]


def test_the_validation_home_holds_no_held_out_chat(tmp_path: Path) -> None:
    silos = personas.write_silos(
        tmp_path / "silos", {"a": "pirate", "b": "poet"}, n_train=20, n_eval=5
    )
    out = carve(tmp_path / "silos", tmp_path / "val", users=["a", "b"])
    for user, silo in silos.items():
        held_out = set(_lines(silo / "eval.jsonl"))
        train = _lines(silo / "train.jsonl")
        v_train, v_eval = _lines(out[user] / "train.jsonl"), _lines(out[user] / "eval.jsonl")
        assert not (set(v_train) | set(v_eval)) & held_out
        assert v_train + v_eval == train and len(v_eval) == 3  # ceil(15% of 20)


def test_split_lines_keeps_both_sides_non_empty() -> None:
    assert split_lines(["1", "2"]) == (["1"], ["2"])
    with pytest.raises(DataError):
        split_lines(["only"])
    with pytest.raises(DataError):
        split_lines(["1", "2"], fraction=1.5)


def test_pydocs_users_share_no_text_and_split_deterministically(tmp_path: Path) -> None:
    silos = pydocs.build(max_train=40)
    assert set(silos) == set(pydocs.PACKAGES)
    assert pydocs.shared_replies(silos) == set()
    for splits in silos.values():
        assert splits["train"] and splits["eval"]
        asked = {c["messages"][0]["content"] for c in splits["train"]}
        assert not asked & {c["messages"][0]["content"] for c in splits["eval"]}
    assert pydocs.build(max_train=40) == silos
    written = pydocs.write_silos(tmp_path, max_train=40)
    manifest = json.loads((tmp_path / pydocs.MANIFEST).read_text())
    assert "Python Software Foundation" in manifest["licence"]
    assert len(_lines(written["email"] / "train.jsonl")) == len(silos["email"]["train"])
