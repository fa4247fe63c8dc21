"""Persona chat generator: determinism, distinct styles, well-formed silos."""

from __future__ import annotations

import json
import re
from itertools import combinations
from pathlib import Path

import pytest
from fedpersona.trainer.data import personas
from fedpersona.trainer.data.personas import (
    PERSONAS,
    PROMPT_SPACE,
    persona_conversations,
    write_silos,
)


def _answers(name: str, n: int = 60, seed: int = 0) -> list[str]:
    return [c["messages"][1]["content"] for c in persona_conversations(name, n, seed)]


def _vocab(texts: list[str]) -> set[str]:
    return {w for t in texts for w in re.findall(r"[a-z]+", t.lower())}


def test_at_least_eight_personas() -> None:
    assert len(PERSONAS) >= 8
    assert len(set(PERSONAS)) == len(PERSONAS)


@pytest.mark.parametrize("name", PERSONAS)
def test_same_seed_same_chats_other_seed_other_chats(name: str) -> None:
    assert persona_conversations(name, 30, seed=1) == persona_conversations(name, 30, seed=1)
    assert persona_conversations(name, 30, seed=1) != persona_conversations(name, 30, seed=2)


@pytest.mark.parametrize("name", PERSONAS)
def test_chats_are_single_turn_with_distinct_prompts(name: str) -> None:
    chats = persona_conversations(name, PROMPT_SPACE, seed=0)
    assert len(chats) == PROMPT_SPACE
    for chat in chats:
        roles = [m["role"] for m in chat["messages"]]
        assert roles == ["user", "assistant"]
        assert all(m["content"].strip() for m in chat["messages"])
    prompts = [c["messages"][0]["content"] for c in chats]
    assert len(set(prompts)) == len(prompts)


def test_personas_answer_the_same_prompts() -> None:
    # Every persona draws from one prompt space, so personalization sees the same question
    # answered differently.
    prompt_sets = [
        {c["messages"][0]["content"] for c in persona_conversations(p, PROMPT_SPACE)}
        for p in PERSONAS
    ]
    assert all(s == prompt_sets[0] for s in prompt_sets)


def test_answer_vocabularies_overlap_little() -> None:
    # Topic words are shared by construction; the persona's own words must dominate.
    topic_words = _vocab(
        [f"{t.noun} {t.adjective} {t.verb}" for t in personas.TOPICS] + ["the", "a", "it"]
    )
    vocab = {p: _vocab(_answers(p)) - topic_words for p in PERSONAS}
    for a, b in combinations(PERSONAS, 2):
        jaccard = len(vocab[a] & vocab[b]) / len(vocab[a] | vocab[b])
        assert jaccard < 0.2, (a, b, sorted(vocab[a] & vocab[b]))


def test_formats_are_recognizable() -> None:
    checks = {
        "engineer": lambda t: t.startswith("```sql\n") and "SELECT" in t,
        "chef": lambda t: "\n1. " in t and "\n5. " in t,
        "sportscaster": lambda t: t == t.upper(),
        "haiku": lambda t: t.count("\n") == 2,
        "poet": lambda t: t.count("\n") == 3,
        "robot": lambda t: isinstance(json.loads(t.split("\n", 1)[1]), dict),
        "pirate": lambda t: any(w in t for w in ("Arr", "Ahoy", "Yo-ho-ho", "timbers")),
        "lawyer": lambda t: "legal advice" in t,
        "kid": lambda t: "super duper" in t,
    }
    assert set(checks) == set(PERSONAS)
    for name, check in checks.items():
        assert all(check(a) for a in _answers(name, 40)), name


def test_unknown_persona_and_too_many_chats_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown persona"):
        persona_conversations("wizard", 1)
    with pytest.raises(ValueError, match="distinct prompts"):
        persona_conversations("pirate", PROMPT_SPACE + 1)


def test_pretraining_mix_is_balanced() -> None:
    chats = personas.pretraining_conversations(5, seed=0)
    assert len(chats) == 5 * len(PERSONAS)
    for i, name in enumerate(PERSONAS):
        assert chats[i] == persona_conversations(name, 5, seed=0)[0]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_write_silos_files_are_well_formed_and_disjoint(tmp_path: Path) -> None:
    users = {"alice": "pirate", "bob": "engineer", "carol": "pirate"}
    silos = write_silos(tmp_path, users, n_train=30, n_eval=10, seed=3)
    assert set(silos) == set(users)
    for user in users:
        assert sorted(p.name for p in (tmp_path / user).iterdir()) == ["eval.jsonl", "train.jsonl"]
        train = _read_jsonl(tmp_path / user / "train.jsonl")
        evals = _read_jsonl(tmp_path / user / "eval.jsonl")
        assert (len(train), len(evals)) == (30, 10)
        for chat in train + evals:
            assert list(chat) == ["messages"]
            assert [m["role"] for m in chat["messages"]] == ["user", "assistant"]
        train_prompts = {c["messages"][0]["content"] for c in train}
        eval_prompts = {c["messages"][0]["content"] for c in evals}
        assert not train_prompts & eval_prompts
    # Two users with one persona get different data.
    assert (tmp_path / "alice" / "train.jsonl").read_bytes() != (
        tmp_path / "carol" / "train.jsonl"
    ).read_bytes()
    # Deterministic: writing again gives the same bytes.
    before = (tmp_path / "bob" / "eval.jsonl").read_bytes()
    write_silos(tmp_path, users, n_train=30, n_eval=10, seed=3)
    assert (tmp_path / "bob" / "eval.jsonl").read_bytes() == before


@pytest.mark.parametrize("user", ["../evil", "Alice", "", "a/b"])
def test_write_silos_refuses_bad_user_ids(tmp_path: Path, user: str) -> None:
    with pytest.raises(ValueError):
        write_silos(tmp_path / "silos", {user: "pirate"}, n_train=2, n_eval=1)
    assert not (tmp_path / "silos").exists() or not any((tmp_path / "silos").iterdir())


def test_write_silos_refuses_bad_counts(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="distinct prompts"):
        write_silos(tmp_path, {"alice": "pirate"}, n_train=PROMPT_SPACE, n_eval=1)
    with pytest.raises(ValueError, match="unknown persona"):
        write_silos(tmp_path, {"alice": "wizard"}, n_train=2, n_eval=1)
