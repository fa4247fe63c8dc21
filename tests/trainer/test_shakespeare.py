"""The Shakespeare converter on a synthetic corpus: LEAF-style turns, top speakers, last turns
held out, sanitized ids, strict parsing, and the CLI command end to end."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from fedpersona.trainer.data import shakespeare
from fedpersona.trainer.data.shakespeare import build_silos, parse_blocks, user_id
from fedpersona.trainer.data.silo import read_chats
from fedpersona.trainer.errors import DataError


def _corpus(turns: list[tuple[str, str]]) -> str:
    return "\n\n".join(f"{speaker}:\n{text}" for speaker, text in turns) + "\n"


# KING RICHARD II speaks 10 times, Lady Anne 6 (one header-only block), First Citizen 4.
SCRIPT: list[tuple[str, str]] = []
for i in range(10):
    SCRIPT.append(("KING RICHARD II", f"Richard line {i}.\nAnd a second line {i}."))
    SCRIPT.append(("Lady Anne" if i % 2 else "First Citizen", f"reply {i}"))
    if i < 2:
        SCRIPT.append(("LADY ANNE", f"anne extra {i}"))


def test_parse_blocks_reads_speakers_and_skips_empty_speeches() -> None:
    text = "A:\nhello\nthere\n\nB:\n\n\nC:\nbye  \n"
    blocks = parse_blocks(text)
    assert [(b.speaker, b.text, b.line) for b in blocks] == [
        ("A", "hello\nthere", 1),
        ("C", "bye", 8),
    ]
    with pytest.raises(DataError, match="line 4: a block must start"):
        parse_blocks("A:\nhi\n\nno header here\nmore\n")


def test_user_ids_are_sanitized() -> None:
    assert user_id("KING RICHARD II") == "king_richard_ii"
    assert user_id("First Citizen") == "first_citizen"
    assert user_id("Lady Capulet's  Nurse") == "lady_capulet_s_nurse"
    assert user_id("???") == "speaker"
    assert len(user_id("X" * 200)) == 63


def test_build_silos_is_leaf_style_with_the_last_turns_held_out() -> None:
    blocks = parse_blocks(_corpus(SCRIPT))
    silos = build_silos(blocks, users=2, eval_fraction=0.2, min_turns=3)
    assert [s.user for s in silos] == ["king_richard_ii", "lady_anne"]  # most turns first
    richard, anne = silos
    assert anne.speakers == ("LADY ANNE", "Lady Anne")  # case variants are one user
    assert len(anne.train) + len(anne.eval) == 7
    # The very first block has no context, so Richard has 9 turns: 7 train + 2 eval (20 %).
    assert (len(richard.train), len(richard.eval)) == (7, 2)
    last = richard.eval[-1]["messages"]
    assert last == [
        {"role": "user", "content": "First Citizen:\nreply 8"},
        {"role": "assistant", "content": "Richard line 9.\nAnd a second line 9."},
    ]
    assert richard.train[0]["messages"][1]["content"].startswith("Richard line 1.")
    assert len(build_silos(blocks, users=3, eval_fraction=0.2, min_turns=5)) == 3
    with pytest.raises(DataError, match="only 2 speakers have at least 6 turns"):
        build_silos(blocks, users=3, eval_fraction=0.2, min_turns=6)
    with pytest.raises(DataError, match="eval-fraction"):
        build_silos(blocks, users=1, eval_fraction=1.0, min_turns=3)


def _args(**kwargs: object) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    shakespeare.add_arguments(parser)
    argv = []
    for key, value in kwargs.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return parser.parse_args(argv)


def test_command_writes_loadable_silos_and_a_manifest(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(_corpus(SCRIPT), encoding="utf-8")
    out = tmp_path / "silos"
    assert shakespeare.run(_args(corpus=corpus, out=out, users=2, min_turns=3)) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "king_richard_ii",
        "lady_anne",
        "shakespeare.json",
    ]
    train = read_chats(out / "king_richard_ii" / "train.jsonl")
    held_out = read_chats(out / "king_richard_ii" / "eval.jsonl")
    assert len(train) == 8 and len(held_out) == 1  # 15 % of 9, rounded, at least one
    manifest = json.loads((out / "shakespeare.json").read_text())
    assert manifest["users"]["lady_anne"] == {
        "speakers": ["LADY ANNE", "Lady Anne"],
        "train": 6,
        "eval": 1,
    }
    assert len(manifest["corpus_sha256"]) == 64
    assert not list(out.rglob("*.tmp"))


def test_command_reports_bad_input_without_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDPERSONA_HOME", str(tmp_path / "home"))
    assert shakespeare.run(_args(corpus=tmp_path / "missing.txt")) == 2
    bad = tmp_path / "bad.txt"
    bad.write_text("no header\n", encoding="utf-8")
    assert shakespeare.run(_args(corpus=bad)) == 2
    assert not (tmp_path / "home").exists()
