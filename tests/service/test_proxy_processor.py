"""The vLLM logits processor driven in-process with real vLLM `BatchUpdate`s (no engine).

The engine's side is played by hand: requests are added, stepped (the live output lists grow),
moved and removed as vLLM's persistent batch does, and each step's logits are checked against
`large + alpha * (expert - small)` computed by full forward passes. Rows without an expert must
come back bit-for-bit unchanged; a failing expert ends only its own row; nothing is leaked.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fedpersona.adapters import AdapterStore, Slot, load_lora
from fedpersona.service.proxy_tuning.errors import IncompatibleModels
from fedpersona.service.proxy_tuning.experts import load_small_model, merge_lora
from fedpersona.service.proxy_tuning.processor import ProxyTuningLogitsProcessor, _frontend_library
from fedpersona.trainer.models.basemodel import ModelPair
from test_proxy_experts import random_lora
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

PAD = 8  # vLLM's logits may be wider than the vocabulary


@pytest.fixture
def env(
    micro_models: ModelPair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> SimpleNamespace:
    store = AdapterStore(tmp_path / "store", max_rank=64)
    small = load_small_model(micro_models.small.path)
    good = store.publish_lora(
        Slot.user_expert("alice"),
        random_lora(small, base_model=micro_models.small.name, seed=3),
        metadata={},
    )
    large_model = load_small_model(micro_models.large.path)  # any causal LM loader will do
    broken = store.publish_lora(  # valid files, but shaped for the (deeper) large model
        Slot.user_expert("mallory"),
        random_lora(large_model, base_model=micro_models.small.name, seed=4),
        metadata={},
    )
    monkeypatch.setenv("FEDPERSONA_PROXY_SMALL_MODEL", str(micro_models.small.path))
    monkeypatch.setenv("FEDPERSONA_STORE_DIR", str(store.root))
    monkeypatch.setenv("FEDPERSONA_PROXY_STATS_FILE", str(tmp_path / "stats.json"))
    vocab = int(small.config.vocab_size)
    config = SimpleNamespace(
        model_config=SimpleNamespace(
            tokenizer=str(micro_models.large.path), get_vocab_size=lambda: vocab + PAD
        )
    )
    proc = ProxyTuningLogitsProcessor(config, torch.device("cpu"), False)  # type: ignore[arg-type]
    expert = merge_lora(small, load_lora(good.path), where="test").eval()
    return SimpleNamespace(
        proc=proc,
        small=small,
        large=large_model,
        expert=expert,
        vocab=vocab,
        good=f"{good.slot.path}@{good.id}",
        broken=f"{broken.slot.path}@{broken.id}",
        eos=small.config.eos_token_id,
        stats=tmp_path / "stats.json",
    )


def _params(expert: str | None, alpha: float = 1.0) -> SamplingParams:
    extra = None if expert is None else {"fedpersona_expert": expert, "fedpersona_alpha": alpha}
    return SamplingParams(temperature=0.0, extra_args=extra)


@torch.no_grad()
def _last(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([tokens])).logits[0, -1]


def test_offsets_rows_moves_failures_and_cleanup(env: SimpleNamespace) -> None:
    proc: ProxyTuningLogitsProcessor = env.proc
    prompts = [[1, 4, 30, 31, 32, 2, 5], [1, 4, 40, 2, 5], [1, 4, 50, 51, 2, 5], [1, 4, 9, 2, 5]]
    outputs: list[list[int]] = [[], [], [], []]
    # Rows: 0 plain, 1 good expert alpha 0.5, 2 good expert alpha 1, 3 broken expert.
    requests = [(None, 1.0), (env.good, 0.5), (env.good, 1.0), (env.broken, 1.0)]
    proc.update_state(
        BatchUpdate(
            batch_size=4,
            removed=[],
            added=[(i, _params(e, a), prompts[i], outputs[i]) for i, (e, a) in enumerate(requests)],
            moved=[],
        )
    )
    rows = [0, 1, 2, 3]  # row -> request
    for step in range(4):
        if step == 2:  # the batch is reordered: swap rows 0 and 2
            proc.update_state(
                BatchUpdate(
                    batch_size=4, removed=[], added=[], moved=[(0, 2, MoveDirectionality.SWAP)]
                )
            )
            rows[0], rows[2] = rows[2], rows[0]
        else:
            proc.update_state(None)
        raw = torch.randn(4, env.vocab + PAD)
        got = proc.apply(raw.clone())
        for row, req in enumerate(rows):
            expert, alpha = requests[req]
            tokens = prompts[req] + outputs[req]
            if expert is None:
                assert torch.equal(got[row], raw[row])  # untouched, bit for bit
            elif expert == env.broken:
                assert int(got[row].argmax()) == env.eos and torch.isinf(got[row]).sum() > 0
            else:
                offset = _last(env.expert, tokens) - _last(env.small, tokens)
                want = raw[row].clone()
                want[: env.vocab] += alpha * offset[: env.vocab]
                torch.testing.assert_close(got[row], want, atol=1e-4, rtol=1e-4)
                assert torch.equal(got[row, env.vocab :], raw[row, env.vocab :])
        for req in range(4):  # the engine appends the sampled tokens to the live lists
            outputs[req].append(60 + step + req)
    stats = proc.stats()
    assert stats["live_requests"] == 3 and stats["failures"] == 1 and stats["kv_bytes"] > 0
    # Request 1 finishes (row 1); condensing moves row 3 into it; then everything finishes.
    proc.update_state(
        BatchUpdate(
            batch_size=3, removed=[1], added=[], moved=[(3, 1, MoveDirectionality.UNIDIRECTIONAL)]
        )
    )
    assert proc.stats()["live_requests"] == 2
    proc.update_state(BatchUpdate(batch_size=0, removed=[0, 1, 2], added=[], moved=[]))
    stats = proc.stats()
    assert stats["live_requests"] == 0 and stats["kv_bytes"] == 0
    assert stats["created"] == stats["freed"] == 3
    assert env.stats.exists() and '"live_requests": 0' in env.stats.read_text()


def test_validate_params_refuses_bad_experts_with_clear_messages(env: SimpleNamespace) -> None:
    _frontend_library.cache_clear()  # built from this test's environment
    ProxyTuningLogitsProcessor.validate_params(_params(None))
    ProxyTuningLogitsProcessor.validate_params(_params(env.good))
    with pytest.raises(ValueError, match="not available"):
        ProxyTuningLogitsProcessor.validate_params(_params("users/zed/expert@0123456789abcdef"))
    with pytest.raises(ValueError, match="not an expert slot"):
        ProxyTuningLogitsProcessor.validate_params(_params("users/zed/served@0123456789abcdef"))
    with pytest.raises(ValueError, match="fedpersona_alpha"):
        ProxyTuningLogitsProcessor.validate_params(_params(env.good, alpha=1e9))


def test_tokenizer_mismatch_stops_the_processor(
    micro_models: ModelPair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDPERSONA_PROXY_SMALL_MODEL", str(micro_models.small.path))
    monkeypatch.setenv("FEDPERSONA_STORE", str(tmp_path / "store"))  # the deprecated name
    other = tmp_path / "other-tokenizer"
    other.mkdir()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(micro_models.small.path))
    tok.add_tokens(["<|extra|>"])
    tok.save_pretrained(str(other))
    config = SimpleNamespace(
        model_config=SimpleNamespace(tokenizer=str(other), get_vocab_size=lambda: 10_000)
    )
    with pytest.raises(IncompatibleModels, match="tokenizer mismatch"):
        ProxyTuningLogitsProcessor(config, torch.device("cpu"), False)  # type: ignore[arg-type]


def test_top_k_approximation_is_opt_in_and_exact_on_its_tokens(
    env: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`FEDPERSONA_PROXY_TOP_K=k` steers only the large model's k best tokens (exact offsets
    there) and masks the rest; the default (0) is the exact processor checked above."""
    monkeypatch.setenv("FEDPERSONA_PROXY_TOP_K", "5")
    vocab = env.vocab
    config = SimpleNamespace(
        model_config=SimpleNamespace(
            tokenizer=str(env.small.name_or_path), get_vocab_size=lambda: vocab + PAD
        )
    )
    proc = ProxyTuningLogitsProcessor(config, torch.device("cpu"), False)  # type: ignore[arg-type]
    prompt, output = [1, 4, 30, 31, 2, 5], []
    proc.update_state(
        BatchUpdate(
            batch_size=2,
            removed=[],
            added=[(0, _params(None), [1, 4, 9], []), (1, _params(env.good, 0.7), prompt, output)],
            moved=[],
        )
    )
    raw = torch.randn(2, vocab + PAD)
    got = proc.apply(raw.clone())
    assert torch.equal(got[0], raw[0])
    top = raw[1, :vocab].topk(5).indices
    offset = _last(env.expert, prompt) - _last(env.small, prompt)
    torch.testing.assert_close(got[1, top], raw[1, top] + 0.7 * offset[top], atol=1e-4, rtol=1e-4)
    rest = torch.ones(vocab, dtype=torch.bool)
    rest[top] = False
    assert torch.isinf(got[1, :vocab][rest]).all()
    assert torch.equal(got[1, vocab:], raw[1, vocab:])
