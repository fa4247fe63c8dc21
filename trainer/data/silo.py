"""A user's chat silo as training examples: JSONL in, token ids and assistant-only labels out.

A silo is a directory with `train.jsonl` and `eval.jsonl`; each line is one chat
`{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}` with at least one
assistant turn. A chat becomes one `Example`:

- the text is exactly what the base model's chat template renders (`apply_chat_template`), so
  training, evaluation and vLLM serving see the same tokens;
- labels are the token ids of the assistant replies (the tokens after the assistant header up
  to and including the end-of-turn token) and `IGNORE_INDEX` everywhere else, so the loss is
  computed on assistant tokens only. Spans are found by rendering chat prefixes with the same
  template, which works for any template whose renderings of a chat's prefixes are prefixes of
  its rendering (checked; a template that is not raises `DataError`);
- chats longer than `max_len` tokens keep their *last* `max_len` tokens: the oldest context is
  dropped first and the replies (at the end) are kept. A chat left with no label token is
  skipped (it can only happen when a chat does not end with an assistant turn).

Batches are deterministic: the order is a numpy permutation per epoch seeded by the caller.
This module knows nothing about LoRA, models or federated learning.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from fedpersona.trainer.errors import DataError

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "eval")
ROLES: tuple[str, ...] = ("system", "user", "assistant")
IGNORE_INDEX = -100

Message = dict[str, str]


class ChatTokenizer(Protocol):
    """The part of a Hugging Face tokenizer this module uses."""

    pad_token_id: int | None

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...

    def __call__(self, text: str, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class Example:
    """One tokenized chat; `labels[i]` is `input_ids[i]` on assistant tokens, else IGNORE_INDEX."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def num_targets(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass(frozen=True)
class Batch:
    """Right-padded tensors of a few examples (pad labels are IGNORE_INDEX)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def silo_file(silo: Path, split: str) -> Path:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
    return Path(silo) / f"{split}.jsonl"


def read_chats(path: Path) -> list[list[Message]]:
    """Parse a chat JSONL file; raise `DataError` naming the file and line of any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise DataError(f"{path}: missing (a silo needs train.jsonl and eval.jsonl)") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not readable as UTF-8 text: {e}") from e
    chats = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON: {e.msg}") from e
        chats.append(_check_chat(record, where=where))
    return chats


def _check_chat(record: object, *, where: str) -> list[Message]:
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise DataError(f'{where}: expected an object {{"messages": [...]}}')
    messages: list[Message] = []
    for i, message in enumerate(record["messages"]):
        if not isinstance(message, dict):
            raise DataError(f"{where}: messages[{i}] is not an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: messages[{i}].role must be one of {ROLES}, got {role!r}")
        if not isinstance(content, str):
            raise DataError(f"{where}: messages[{i}].content must be a string")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the chat has no assistant turn (nothing to learn from)")
    return messages


def _render(tokenizer: ChatTokenizer, messages: list[Message]) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    if not isinstance(text, str):
        raise DataError("the tokenizer's chat template did not render text")
    return text


# Stands in for a reply's content to find where the template puts the content of that turn.
_SENTINEL = "\x00fedpersona-reply\x00"


def assistant_spans(tokenizer: ChatTokenizer, messages: list[Message]) -> tuple[str, list[range]]:
    """The rendered chat and the character ranges of its assistant replies (incl. end token).

    A reply's range starts where the template writes its content (found by rendering the chat
    up to that turn with a sentinel content) and ends where the rendering of the chat up to and
    including that turn ends.
    """
    full = _render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        probe = _render(tokenizer, [*messages[:i], {"role": "assistant", "content": _SENTINEL}])
        start = probe.find(_SENTINEL)
        end_text = _render(tokenizer, messages[: i + 1])
        if start < 0 or not (full.startswith(probe[:start]) and full.startswith(end_text)):
            raise DataError(
                "the chat template renders a prefix of a chat differently from the chat itself; "
                "assistant tokens cannot be located"
            )
        spans.append(range(start, len(end_text)))
    return full, spans


def encode_chat(tokenizer: ChatTokenizer, messages: list[Message], *, max_len: int) -> Example:
    """Tokenize one chat with assistant-only labels, keeping its last `max_len` tokens.

    A token is labelled when its first character lies inside an assistant span, so a token
    that straddles the assistant header and the reply (rare with byte-level BPE) is not.
    """
    if max_len < 2:
        raise DataError(f"max_len must be at least 2, got {max_len}")
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(encoded["input_ids"])
    offsets: list[tuple[int, int]] = list(encoded["offset_mapping"])
    labels = [
        token if end > start and any(start in span for span in spans) else IGNORE_INDEX
        for token, (start, end) in zip(ids, offsets, strict=True)
    ]
    return Example(input_ids=tuple(ids[-max_len:]), labels=tuple(labels[-max_len:]))


def load_examples(
    silo: Path, split: str, tokenizer: ChatTokenizer, *, max_len: int
) -> list[Example]:
    """All chats of a silo split as examples (chats without a label token left are dropped)."""
    path = silo_file(silo, split)
    examples = [encode_chat(tokenizer, chat, max_len=max_len) for chat in read_chats(path)]
    kept = [e for e in examples if e.num_targets > 0]
    if len(kept) < len(examples):
        log.debug(
            "%s: %d chats have no assistant token within max_len", path, len(examples) - len(kept)
        )
    if not kept:
        raise DataError(f"{path}: no chat with an assistant reply (the file may be empty)")
    return kept


def collate(examples: Sequence[Example], *, pad_id: int) -> Batch:
    """Right-pad `examples` to the longest one."""
    if not examples:
        raise DataError("cannot build a batch from no examples")
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(example.labels, dtype=torch.long)
        mask[row, :n] = 1
    return Batch(input_ids=ids, attention_mask=mask, labels=labels)


def batch_order(n: int, *, batch_size: int, seed: Sequence[int]) -> Iterator[list[int]]:
    """Endless deterministic batches of indices into `n` examples.

    Each epoch is a fresh permutation drawn from a generator seeded with `seed` (a sequence of
    ints, e.g. (run seed, round, user)); batches may span two epochs. A batch never holds more
    than `n` indices.
    """
    if n < 1:
        raise DataError("cannot batch an empty dataset")
    size = min(batch_size, n)
    rng = np.random.default_rng(np.random.SeedSequence(list(seed)))
    pending: list[int] = []
    while True:
        while len(pending) < size:
            pending.extend(int(i) for i in rng.permutation(n))
        yield pending[:size]
        pending = pending[size:]


def sequential_batches(examples: Sequence[Example], *, batch_size: int) -> Iterator[list[Example]]:
    """`examples` in order, in chunks of `batch_size` (evaluation)."""
    for start in range(0, len(examples), batch_size):
        yield list(examples[start : start + batch_size])
