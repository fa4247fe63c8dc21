"""Chat silo loading: assistant-only labels, truncation, strict parsing, deterministic batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fedpersona.trainer.data.silo import (
    IGNORE_INDEX,
    batch_order,
    collate,
    encode_chat,
    load_examples,
    read_chats,
)
from fedpersona.trainer.errors import DataError
from fedpersona.trainer.learn.lora_train import load_tokenizer
from fedpersona.trainer.models.basemodel import ModelPair

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello, friend!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Farewell."},
]


@pytest.fixture(scope="module")
def tokenizer(micro_models: ModelPair):  # type: ignore[no-untyped-def]
    return load_tokenizer(micro_models.large.path)


def _labelled_runs(example) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """Maximal runs of consecutive labelled positions, as token id lists."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in example.labels:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return runs


def test_labels_cover_exactly_the_assistant_replies(tokenizer) -> None:  # type: ignore[no-untyped-def]
    example = encode_chat(tokenizer, CHAT, max_len=1000)
    text = tokenizer.decode(list(example.input_ids), skip_special_tokens=False)
    # Hand-checked rendering of the template (trainer/models/tokenizer.py).
    assert text == (
        "<|bos|><|system|>\nBe brief.<|end|><|user|>\nHi there<|end|>"
        "<|assistant|>\nHello, friend!<|end|><|user|>\nBye<|end|><|assistant|>\nFarewell.<|end|>"
    )
    runs = _labelled_runs(example)
    decoded = [tokenizer.decode(run, skip_special_tokens=False) for run in runs]
    assert decoded == ["Hello, friend!<|end|>", "Farewell.<|end|>"]
    # labels equal input ids where set, and the token before each reply is the header's "\n"
    for i, label in enumerate(example.labels):
        if label != IGNORE_INDEX:
            assert label == example.input_ids[i]
    first = example.labels.index(runs[0][0])
    assert tokenizer.decode([example.input_ids[first - 1]]) == "\n"
    assert tokenizer.decode([example.input_ids[first - 2]], skip_special_tokens=False) == (
        "<|assistant|>"
    )
    assert example.num_targets == sum(len(r) for r in runs)


def test_truncation_keeps_the_last_tokens_and_their_labels(tokenizer) -> None:  # type: ignore[no-untyped-def]
    full = encode_chat(tokenizer, CHAT, max_len=1000)
    short = encode_chat(tokenizer, CHAT, max_len=8)
    assert len(short.input_ids) == 8
    assert short.input_ids == full.input_ids[-8:]
    assert short.labels == full.labels[-8:]


def _write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_examples_reads_a_silo_and_drops_chats_without_targets(tmp_path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    long_user = [
        {"role": "assistant", "content": "Early reply."},
        {"role": "user", "content": "word " * 200},
    ]
    _write(
        tmp_path / "u" / "train.jsonl",
        [json.dumps({"messages": CHAT}), "", json.dumps({"messages": long_user})],
    )
    examples = load_examples(tmp_path / "u", "train", tokenizer, max_len=32)
    assert len(examples) == 1  # the second chat's reply fell outside the last 32 tokens
    assert examples[0].num_targets > 0


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"messages": "hi"}', "expected an object"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "role must be one of"),
        ('{"messages": [{"role": "user", "content": 3}]}', "content must be a string"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, line: str, message: str) -> None:  # type: ignore[no-untyped-def]
    path = _write(tmp_path / "train.jsonl", [json.dumps({"messages": CHAT}), line])
    with pytest.raises(DataError, match=message) as info:
        read_chats(path)
    assert f"{path}:2:" in str(info.value)


def test_missing_file_and_unknown_split(tmp_path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DataError, match="missing"):
        load_examples(tmp_path, "train", tokenizer, max_len=64)
    with pytest.raises(DataError, match="unknown split"):
        load_examples(tmp_path, "test", tokenizer, max_len=64)
    _write(tmp_path / "eval.jsonl", [""])
    with pytest.raises(DataError, match="no chat"):
        load_examples(tmp_path, "eval", tokenizer, max_len=64)


def test_batch_order_is_deterministic_and_covers_each_epoch() -> None:
    first = batch_order(10, batch_size=5, seed=(1, 2, 3))
    again = batch_order(10, batch_size=5, seed=(1, 2, 3))
    other = batch_order(10, batch_size=5, seed=(1, 2, 4))
    a = [next(first) for _ in range(6)]
    assert a == [next(again) for _ in range(6)]
    assert a != [next(other) for _ in range(6)]
    for epoch in range(3):
        assert sorted(a[2 * epoch] + a[2 * epoch + 1]) == list(range(10))
    small = batch_order(3, batch_size=8, seed=(0,))
    assert sorted(next(small)) == [0, 1, 2]


def test_collate_right_pads_with_ignored_labels(tokenizer) -> None:  # type: ignore[no-untyped-def]
    long = encode_chat(tokenizer, CHAT, max_len=1000)
    short = encode_chat(tokenizer, CHAT[1:3], max_len=1000)
    batch = collate([long, short], pad_id=0)
    n = len(short.input_ids)
    assert batch.input_ids.shape == (2, len(long.input_ids))
    assert batch.attention_mask[1].tolist() == [1] * n + [0] * (len(long.input_ids) - n)
    assert batch.labels[1, n:].eq(IGNORE_INDEX).all()
    assert batch.input_ids[1, :n].tolist() == list(short.input_ids)
