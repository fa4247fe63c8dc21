"""The shared byte-level BPE tokenizer of the base models, and its chat format.

A `tokenizers` byte-level BPE is trained locally (deterministically) on the pretraining text and
wrapped as a `transformers.PreTrainedTokenizerFast` that carries the chat template below, so
vLLM, PEFT training and evaluation all render chats identically.

Rendered format (exact; no newline between turns, one after each role header)::

    <|bos|><|system|>\\n{system}<|end|><|user|>\\n{user}<|end|><|assistant|>\\n{assistant}<|end|>

- `<|bos|>` once at the start (the template writes it; the tokenizer adds no special tokens on
  its own, matching vLLM, which tokenizes rendered chats without adding any).
- Each turn is `<|{role}|>` + `"\\n"` + content + `<|end|>`; roles are system, user, assistant.
- `add_generation_prompt=True` appends `<|assistant|>\\n`.
- `eos_token` is `<|end|>`: generation stops at the end of an assistant turn. A loss on the
  assistant only covers the tokens after `<|assistant|>\\n` up to and including its `<|end|>`.
- `<|pad|>` pads batches; it never appears in rendered text.

This module knows nothing about models or training.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

BOS = "<|bos|>"
END = "<|end|>"
PAD = "<|pad|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, END, SYSTEM, USER, ASSISTANT)
ROLES: tuple[str, ...] = ("system", "user", "assistant")

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def render_turn(role: str, content: str) -> str:
    """One turn exactly as the chat template renders it (pure; for corpora and masks)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
    return f"<|{role}|>\n{content}{END}"


def render_chat(messages: Iterable[dict[str, str]]) -> str:
    """A whole chat as the template renders it without a generation prompt (pure)."""
    return BOS + "".join(render_turn(m["role"], m["content"]) for m in messages)


_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


def _batches(texts: Iterable[str], size: int = 256) -> Iterator[list[str]]:
    # The BPE trainer does not know special tokens while it counts pairs; cutting them out
    # keeps merges like "<|" + "end" from wasting the vocabulary.
    batch: list[str] = []
    for text in texts:
        batch.extend(piece for piece in _SPECIAL_RE.split(text) if piece)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def train_tokenizer(
    texts: Iterable[str], *, vocab_size: int, model_max_length: int = 1024
) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE on `texts` and wrap it with the chat template.

    Deterministic for the same texts and vocab size. The vocabulary holds the special tokens,
    the 256 byte symbols and up to `vocab_size` minus those in merges (fewer when the text has
    no more frequent pairs). Special tokens in the texts are kept whole, never split.
    """
    minimum = len(SPECIAL_TOKENS) + 256
    if vocab_size <= minimum:
        raise ValueError(f"vocab_size must exceed {minimum} (specials + bytes), got {vocab_size}")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_batches(texts), trainer=trainer)
    return wrap(core, model_max_length=model_max_length)


def wrap(core: Tokenizer, *, model_max_length: int) -> PreTrainedTokenizerFast:
    """Wrap a trained `tokenizers.Tokenizer` with the special tokens and the chat template."""
    # Imported here: rendering chats (`render_chat`) must not cost a transformers import.
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=END,
        pad_token=PAD,
        additional_special_tokens=[SYSTEM, USER, ASSISTANT],
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
