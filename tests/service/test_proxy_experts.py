"""Expert naming, loading and caching, and the incremental decoder, on the MICRO models.

Real PEFT files in a real `AdapterStore`; no vLLM. Errors must name what is wrong.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from fedpersona.adapters import AdapterStore, InvalidName, LoraAdapter, Slot
from fedpersona.adapters.manifest import model_name
from fedpersona.service.proxy_tuning.decoder import Decoder
from fedpersona.service.proxy_tuning.errors import (
    ExpertUnavailable,
    IncompatibleModels,
    InvalidExpertRequest,
)
from fedpersona.service.proxy_tuning.experts import (
    ExpertLibrary,
    ExpertRef,
    ExpertRequest,
    check_shared_tokenizer,
    load_small_model,
    merge_lora,
)
from fedpersona.service.proxy_tuning.lora_rows import expert_weights, routed
from fedpersona.service.proxy_tuning.state import KVStream
from fedpersona.trainer.models.basemodel import ModelPair
from transformers import AutoModelForCausalLM

TARGETS = ("q_proj", "v_proj", "down_proj")


def random_lora(model: torch.nn.Module, *, base_model: str, seed: int, r: int = 4) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if name.endswith(TARGETS):
            out_f, in_f = module.weight.shape
            key = f"base_model.model.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, in_f, generator=g) * 0.2
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, r, generator=g) * 0.2
    return LoraAdapter(
        r=r, alpha=2 * r, target_modules=TARGETS, base_model=base_model, tensors=tensors
    )


def weight(model: torch.nn.Module, name: str) -> torch.Tensor:
    w = model.get_submodule(name).weight
    assert isinstance(w, torch.Tensor)
    return w


@pytest.fixture(scope="module")
def small(micro_models: ModelPair) -> torch.nn.Module:
    return load_small_model(micro_models.small.path)


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    return AdapterStore(tmp_path / "store", max_rank=64)


def _library(
    store: AdapterStore, small: torch.nn.Module, name: str, capacity: int = 2
) -> ExpertLibrary:
    return ExpertLibrary(store=store, base=small, base_name=name, capacity=capacity, max_rank=64)


# ------------------------------------------------------------------ names and request args


@pytest.mark.parametrize(
    "text",
    [
        "users/alice/expert",  # no version
        "users/alice/expert@ABCDEF0123456789",  # upper case
        "users/alice/expert@0123",  # too short
        "users/alice/served@0123456789abcdef",  # not an expert slot
        "global/adapters/x@0123456789abcdef",  # not an expert slot
        "users/../expert@0123456789abcdef",
        "/etc/passwd@0123456789abcdef",
        "users/Alice/expert@0123456789abcdef",
        42,
    ],
)
def test_bad_expert_names_are_refused(text: object) -> None:
    with pytest.raises(InvalidName, match="fedpersona_expert"):
        ExpertRef.parse(text)
    with pytest.raises(InvalidExpertRequest, match="fedpersona_expert"):
        ExpertRequest.from_extra_args({"fedpersona_expert": text})


def test_expert_names_round_trip() -> None:
    for text in ("users/alice/expert@0123456789abcdef", "global/expert@fedcba9876543210"):
        assert str(ExpertRef.parse(text)) == text


def test_request_args() -> None:
    assert ExpertRequest.from_extra_args(None) is None
    assert ExpertRequest.from_extra_args({"other": 1}) is None
    req = ExpertRequest.from_extra_args({"fedpersona_expert": "global/expert@0123456789abcdef"})
    assert req is not None and req.alpha == 1.0 and req.ref.slot == Slot.global_expert()
    for alpha in ("1", float("nan"), 11.0, True):
        with pytest.raises(InvalidExpertRequest, match="fedpersona_alpha"):
            ExpertRequest.from_extra_args(
                {"fedpersona_expert": "global/expert@0123456789abcdef", "fedpersona_alpha": alpha}
            )


# ------------------------------------------------------------------ tokenizer check


def test_shared_tokenizer_is_accepted(micro_models: ModelPair) -> None:
    size = check_shared_tokenizer(
        large_tokenizer=micro_models.large.path, small_model=micro_models.small.path
    )
    assert (
        size == AutoModelForCausalLM.from_pretrained(str(micro_models.small.path)).config.vocab_size
    )


def test_tokenizer_mismatch_is_refused(micro_models: ModelPair, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(micro_models.small.path, other)
    tok = other / "tokenizer.json"
    text = tok.read_text()
    # Swap the ids of two ordinary tokens: same size, different mapping.
    data = json.loads(text)
    vocab = data["model"]["vocab"]
    t1, t2 = "a", "b"
    vocab[t1], vocab[t2] = vocab[t2], vocab[t1]
    tok.write_text(json.dumps(data))
    with pytest.raises(IncompatibleModels, match=r"tokenizer mismatch.*differ"):
        check_shared_tokenizer(large_tokenizer=micro_models.large.path, small_model=other)


def test_missing_small_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(IncompatibleModels, match="small model"):
        load_small_model(tmp_path / "nothing")


# ------------------------------------------------------------------ loading through the store


def test_expert_is_merged_exactly(
    micro_models: ModelPair, small: torch.nn.Module, store: AdapterStore
) -> None:
    adapter = random_lora(small, base_model=micro_models.small.name, seed=0)
    version = store.publish_lora(Slot.user_expert("alice"), adapter, metadata={})
    library = _library(store, small, micro_models.small.name)
    ref = ExpertRef(Slot.user_expert("alice"), version.id)
    library.check(ref)
    expert = library.get(ref)
    assert library.get(ref) is expert and library.loads == 1
    name = "model.layers.0.self_attn.q_proj"
    a, scaled_b = expert.factors[name]
    torch.testing.assert_close(scaled_b @ a, adapter.delta(f"base_model.model.{name}"))
    assert set(expert.factors) == {k.removeprefix("base_model.model.") for k in adapter.modules()}
    # The reference merge adds the same update to a copy; the base model is untouched.
    merged = merge_lora(small, adapter, where="test")
    expected = weight(small, name) + adapter.delta(f"base_model.model.{name}")
    torch.testing.assert_close(weight(merged, name), expected)
    assert not torch.equal(weight(small, name), weight(merged, name))


def test_cache_is_bounded_lru(
    micro_models: ModelPair, small: torch.nn.Module, store: AdapterStore
) -> None:
    library = _library(store, small, micro_models.small.name, capacity=2)
    refs = []
    for i, user in enumerate(("u1", "u2", "u3")):
        adapter = random_lora(small, base_model=micro_models.small.name, seed=i)
        refs.append(
            ExpertRef(
                Slot.user_expert(user),
                store.publish_lora(Slot.user_expert(user), adapter, metadata={}).id,
            )
        )
    first = library.get(refs[0])
    library.get(refs[1])
    library.get(refs[0])  # refresh: refs[1] is now the least recently used
    library.get(refs[2])
    assert len(library) == 2
    assert library.get(refs[0]) is first and library.loads == 3
    library.get(refs[1])
    assert library.loads == 4


def test_missing_expert_is_refused(
    micro_models: ModelPair, small: torch.nn.Module, store: AdapterStore
) -> None:
    library = _library(store, small, micro_models.small.name)
    ref = ExpertRef(Slot.user_expert("nobody"), "0123456789abcdef")
    with pytest.raises(ExpertUnavailable, match="users/nobody/expert@0123456789abcdef"):
        library.check(ref)
    with pytest.raises(ExpertUnavailable, match="no version"):
        library.get(ref)


def test_expert_with_missing_files_is_refused(
    micro_models: ModelPair, small: torch.nn.Module, store: AdapterStore
) -> None:
    adapter = random_lora(small, base_model=micro_models.small.name, seed=0)
    version = store.publish_lora(Slot.user_expert("alice"), adapter, metadata={})
    (version.path / "adapter_model.safetensors").unlink()
    library = _library(store, small, micro_models.small.name)
    with pytest.raises(ExpertUnavailable, match=r"adapter_model\.safetensors"):
        library.get(ExpertRef(version.slot, version.id))


def test_expert_of_another_base_model_is_refused(
    micro_models: ModelPair, small: torch.nn.Module, store: AdapterStore
) -> None:
    adapter = random_lora(small, base_model=micro_models.large.name, seed=0)
    version = store.publish_lora(Slot.user_expert("alice"), adapter, metadata={})
    library = _library(store, small, micro_models.small.name)
    with pytest.raises(ExpertUnavailable, match="base_model_name_or_path"):
        library.check(ExpertRef(version.slot, version.id))


def test_expert_that_does_not_fit_the_small_model_is_refused(
    micro_models: ModelPair, small: torch.nn.Module, store: AdapterStore
) -> None:
    large = AutoModelForCausalLM.from_pretrained(str(micro_models.large.path))
    # Trained on a model with more layers: layer 1 does not exist in the small model.
    adapter = random_lora(large, base_model=micro_models.small.name, seed=0)
    version = store.publish_lora(Slot.user_expert("alice"), adapter, metadata={})
    library = _library(store, small, micro_models.small.name)
    with pytest.raises(ExpertUnavailable, match="does not exist in the small model"):
        library.get(ExpertRef(version.slot, version.id))


def test_model_name_reads_the_marker(micro_models: ModelPair) -> None:
    assert model_name(micro_models.small.path) == micro_models.small.name


# ------------------------------------------------------------------ the incremental decoder


def test_incremental_batched_decoding_equals_full_forward(small: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(5, 300, (n,), generator=g).tolist() for n in (6, 11, 3, 15)]
    streams = [KVStream() for _ in seqs]
    decoder = Decoder()
    for step in range(5):
        # Requests join at different steps and then advance one token per step.
        tokens = [s[: max(1, len(s) - 4 + step)] for s in seqs]
        decoder.advance(small, streams, tokens)
        for stream, toks in zip(streams, tokens, strict=True):
            assert stream.length == len(toks)
            full = small(input_ids=torch.tensor([toks])).logits[0, -1]
            assert stream.last_logits is not None
            torch.testing.assert_close(stream.last_logits, full, atol=1e-4, rtol=1e-4)


def test_per_row_experts_in_one_batch_equal_merged_models(
    micro_models: ModelPair, small: torch.nn.Module
) -> None:
    """Rows routed to different experts (and to none) in one forward pass compute what each
    merged expert computes alone; afterwards the model is the plain base again."""
    adapters = [random_lora(small, base_model=micro_models.small.name, seed=s) for s in (1, 2)]
    experts = [expert_weights(small, a, where="test") for a in adapters]
    merged = [merge_lora(small, a, where="test").eval() for a in adapters]
    x = torch.randint(5, 300, (5, 7), generator=torch.Generator().manual_seed(0))
    # Rows 0 and 3 share expert 0 (not contiguous: an index), row 1 expert 1, rows 2, 4 none.
    rows = [experts[0], experts[1], None, experts[0], None]
    want_models = [merged[0], merged[1], small, merged[0], small]
    with torch.no_grad():
        with routed(small, rows):
            got = small(input_ids=x).logits
        for row, model in enumerate(want_models):
            want = model(input_ids=x[row : row + 1]).logits[0]
            torch.testing.assert_close(got[row], want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(
            small(input_ids=x).logits, torch.cat([small(input_ids=r[None]).logits for r in x])
        )


def test_decoder_with_experts_and_without_head(
    micro_models: ModelPair, small: torch.nn.Module
) -> None:
    """Base and expert streams in one batch, head skipped: the hidden states' difference times
    the head is the merged expert's logits minus the base's, step after step."""
    adapter = random_lora(small, base_model=micro_models.small.name, seed=5)
    expert, merged = (
        expert_weights(small, adapter, where="t"),
        merge_lora(small, adapter, where="t"),
    )
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(5, 300, (n,), generator=g).tolist() for n in (6, 9, 6)]
    base = [KVStream() for _ in seqs]
    tuned = [KVStream() for _ in seqs]
    decoder = Decoder()
    head = small.get_output_embeddings().weight
    for step in range(4):
        tokens = [s[: len(s) - 3 + step] for s in seqs]
        decoder.advance(
            small, base + tuned, tokens + tokens, experts=[None] * 3 + [expert] * 3, head=False
        )
        for b, t, toks in zip(base, tuned, tokens, strict=True):
            assert b.length == t.length == len(toks) and b.last_logits is None
            assert b.last_hidden is not None and t.last_hidden is not None
            got = (t.last_hidden - b.last_hidden) @ head.T
            x = torch.tensor([toks])
            with torch.no_grad():
                want = merged(input_ids=x).logits[0, -1] - small(input_ids=x).logits[0, -1]
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
