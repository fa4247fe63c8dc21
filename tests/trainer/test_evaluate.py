"""Perplexity: assistant tokens only, token-weighted across chats, the adapter is what is served."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fedpersona.trainer.data.silo import encode_chat
from fedpersona.trainer.errors import MethodError
from fedpersona.trainer.learn.evaluate import perplexity
from fedpersona.trainer.learn.lora_train import LoraSession, load_base_model, load_tokenizer
from fedpersona.trainer.methods import LoraSpec
from fedpersona.trainer.models.basemodel import ModelPair

CHATS = [
    [
        {"role": "user", "content": "Tell me about the sea."},
        {"role": "assistant", "content": "Arr, it be deep."},
    ],
    [
        {"role": "system", "content": "Answer in SQL."},
        {"role": "user", "content": "What is coffee?"},
        {"role": "assistant", "content": "SELECT bitter FROM coffee LIMIT 1;"},
    ],
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture()
def silo(tmp_path: Path) -> Path:
    (tmp_path / "eval.jsonl").write_text(
        "".join(json.dumps({"messages": c}) + "\n" for c in CHATS), encoding="utf-8"
    )
    return tmp_path


def _hf_mean_loss(model: torch.nn.Module, tokenizer, chat) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    """Hugging Face's own mean loss of one chat over its labelled tokens, and their count."""
    example = encode_chat(tokenizer, chat, max_len=512)
    ids = torch.tensor([example.input_ids])
    labels = torch.tensor([example.labels])
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=labels).loss)
    # HF shifts labels by one: the first position is never a target.
    count = sum(1 for label in example.labels[1:] if label != -100)
    return loss, count


def test_perplexity_is_the_token_weighted_mean_over_assistant_tokens(
    micro_models: ModelPair, silo: Path
) -> None:
    model = load_base_model(micro_models.large)
    tokenizer = load_tokenizer(micro_models.large.path)
    parts = [_hf_mean_loss(model, tokenizer, chat) for chat in CHATS]
    assert parts[0][1] != parts[1][1]  # different lengths, so the weighting matters
    expected = math.exp(sum(loss * n for loss, n in parts) / sum(n for _, n in parts))
    assert perplexity(micro_models.large, None, silo) == pytest.approx(expected, rel=1e-5)
    assert perplexity(micro_models.large, None, silo, batch_size=1) == pytest.approx(
        expected, rel=1e-5
    )


def test_perplexity_applies_the_adapter(micro_models: ModelPair, silo: Path) -> None:
    session = LoraSession(micro_models.large, {"main": LoraSpec(rank=2, alpha=4.0)}, seed=0)
    zero = session.adapter("main")  # B = 0: the same model as the base
    base = perplexity(micro_models.large, None, silo)
    assert perplexity(micro_models.large, zero, silo) == pytest.approx(base, rel=1e-6)
    params = session.read("main")
    session.write("main", {k: v + 0.05 for k, v in params.items()})
    assert perplexity(micro_models.large, session.adapter("main"), silo) != pytest.approx(
        base, rel=1e-3
    )


def test_perplexity_refuses_an_adapter_of_another_base_model(
    micro_models: ModelPair, silo: Path
) -> None:
    small = LoraSession(micro_models.small, {"main": LoraSpec(rank=2, alpha=4.0)}, seed=0)
    with pytest.raises(MethodError, match="trained on"):
        perplexity(micro_models.large, small.adapter("main"), silo)
