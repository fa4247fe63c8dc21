"""Base models: deterministic builds, the cache, the tokenizer and chat template, the CLI."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from fedpersona.trainer.commands import models as bootstrap
from fedpersona.trainer.errors import DataError
from fedpersona.trainer.models.basemodel import (
    MICRO,
    RECIPES,
    TINY,
    ModelPair,
    ModelSize,
    build_models,
    read_marker,
)
from fedpersona.trainer.models.tokenizer import (
    ASSISTANT,
    BOS,
    END,
    SPECIAL_TOKENS,
    render_chat,
    train_tokenizer,
)
from transformers import AutoTokenizer, LlamaForCausalLM

CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "How should I brew coffee?"},
    {"role": "assistant", "content": "Arr, matey! Brew it strong."},
]


def _files(pair: ModelPair) -> dict[str, bytes]:
    return {
        f"{info.role}/{path.name}": path.read_bytes()
        for info in (pair.large, pair.small)
        for path in sorted(info.path.iterdir())
    }


# --- recipes -------------------------------------------------------------------------------


def test_recipes_have_the_promised_shapes() -> None:
    assert (TINY.large.layers, TINY.large.hidden, TINY.large.heads) == (4, 256, 4)
    assert (TINY.small.layers, TINY.small.hidden, TINY.small.heads) == (2, 128, 2)
    assert (MICRO.large.layers, MICRO.large.hidden, MICRO.small.layers) == (2, 128, 1)
    assert TINY.max_position_embeddings >= 512
    assert set(RECIPES) | {bootstrap.DEFAULT_RECIPE} == set(bootstrap.RECIPE_NAMES)


def test_head_dim_must_be_64() -> None:
    with pytest.raises(ValueError, match="head_dim 64"):
        ModelSize(layers=1, hidden=128, heads=8, intermediate=64)


def test_recipe_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="seq_len"):
        dataclasses.replace(MICRO, seq_len=MICRO.max_position_embeddings + 1)
    with pytest.raises(ValueError, match="lr"):
        dataclasses.replace(MICRO, lr=0.0)


def test_hash_covers_every_field() -> None:
    assert MICRO.hash() == dataclasses.replace(MICRO).hash()
    assert len({MICRO.hash(), TINY.hash(), dataclasses.replace(MICRO, seed=1).hash()}) == 3
    assert MICRO.with_corpus("a").hash() != MICRO.with_corpus("b").hash()


# --- building and caching ------------------------------------------------------------------


def test_two_builds_are_byte_identical(tmp_path: Path) -> None:
    first = build_models(tmp_path / "one", MICRO, progress=False)
    second = build_models(tmp_path / "two", MICRO, progress=False)
    assert not first.cache_hit and not second.cache_hit
    one, two = _files(first), _files(second)
    assert "large/model.safetensors" in one and "small/model.safetensors" in one
    assert one == two


def test_second_call_is_a_cache_hit_and_a_new_recipe_rebuilds(tmp_path: Path) -> None:
    built = build_models(tmp_path, MICRO, progress=False)
    weights = (built.large.path / "model.safetensors").stat().st_mtime_ns
    again = build_models(tmp_path, MICRO, progress=False)
    assert again.cache_hit
    assert (again.large.path / "model.safetensors").stat().st_mtime_ns == weights
    assert again.large.recipe_hash == built.large.recipe_hash

    changed = dataclasses.replace(MICRO, steps=MICRO.steps + 1)
    rebuilt = build_models(tmp_path, changed, progress=False)
    assert not rebuilt.cache_hit
    assert rebuilt.large.recipe_hash != built.large.recipe_hash
    for info in (rebuilt.large, rebuilt.small):
        assert read_marker(info.path)["recipe_hash"] == rebuilt.large.recipe_hash  # type: ignore[index]
    # Nothing but the two model dirs and the lock is left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "large", "small"]


def test_force_and_damaged_cache_rebuild(tmp_path: Path) -> None:
    build_models(tmp_path, MICRO, progress=False)
    assert not build_models(tmp_path, MICRO, progress=False, force=True).cache_hit
    (tmp_path / "small" / "model.safetensors").unlink()
    assert not build_models(tmp_path, MICRO, progress=False).cache_hit
    assert (tmp_path / "small" / "model.safetensors").is_file()


def test_corpus_changes_the_models_and_too_short_a_corpus_is_refused(tmp_path: Path) -> None:
    text = "To be, or not to be, that is the question.\n" * 60
    pair = build_models(tmp_path / "c", MICRO, corpus_text=text, progress=False)
    default = build_models(tmp_path / "d", MICRO, progress=False)
    assert pair.large.recipe_hash != default.large.recipe_hash
    with pytest.raises(DataError, match="too short"):
        build_models(tmp_path / "e", MICRO, corpus_text="tiny", progress=False)
    assert not (tmp_path / "e" / "large").exists()


def test_saved_model_follows_the_contract(micro_models: ModelPair) -> None:
    for info, size in ((micro_models.large, MICRO.large), (micro_models.small, MICRO.small)):
        marker = read_marker(info.path)
        assert marker is not None
        assert marker["name"] == info.name == f"fedpersona-micro-{info.role}"
        assert marker["role"] == info.role
        assert marker["recipe_hash"] == info.recipe_hash
        config = json.loads((info.path / "config.json").read_text())
        assert config["model_type"] == "llama"
        assert config["head_dim"] == 64
        assert config["num_hidden_layers"] == size.layers
        assert config["hidden_size"] == size.hidden
        assert config["dtype"] == "float32"
        tok = AutoTokenizer.from_pretrained(info.path)
        generation = json.loads((info.path / "generation_config.json").read_text())
        assert (
            generation["eos_token_id"] == config["eos_token_id"] == tok.convert_tokens_to_ids(END)
        )
        assert config["vocab_size"] == len(tok)


def test_pretraining_lowers_the_loss_below_uniform(micro_models: ModelPair) -> None:
    marker = read_marker(micro_models.large.path)
    assert marker is not None
    assert float(str(marker["final_loss"])) < math.log(float(str(marker["recipe"]["vocab_size"])))  # type: ignore[index]


def test_model_loads_and_generates(micro_models: ModelPair) -> None:
    tok = AutoTokenizer.from_pretrained(micro_models.large.path)
    model = LlamaForCausalLM.from_pretrained(micro_models.large.path)
    text = tok.apply_chat_template(CHAT[:2], add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        # transformers 5 annotates `generate`'s self as a protocol mypy cannot match.
        out = model.generate(ids, max_new_tokens=5, do_sample=False)  # type: ignore[misc]
    assert isinstance(out, torch.Tensor)
    assert out.shape[1] > ids.shape[1]
    assert torch.equal(out[:, : ids.shape[1]], ids)
    assert model.dtype == torch.float32


# --- tokenizer and chat template -----------------------------------------------------------


def test_tokenizer_training_is_deterministic_and_round_trips() -> None:
    texts = ["Ahoy matey, brew the coffee strong!\n", "SELECT level FROM money;\n"] * 50
    a = train_tokenizer(texts, vocab_size=320)
    b = train_tokenizer(texts, vocab_size=320)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    sample = "Héllo wörld — 你好 😀\n\ttabs   and spaces <not special>"
    ids = a(sample, add_special_tokens=False)["input_ids"]
    assert a.decode(ids) == sample
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(texts, vocab_size=100)


def test_special_tokens_are_single_ids(micro_models: ModelPair) -> None:
    tok = AutoTokenizer.from_pretrained(micro_models.small.path)
    for special in SPECIAL_TOKENS:
        assert tok(special, add_special_tokens=False)["input_ids"] == [
            tok.convert_tokens_to_ids(special)
        ]
    assert tok.eos_token == END and tok.bos_token == BOS
    # Plain encoding adds nothing: the chat template writes <|bos|> itself.
    assert BOS not in tok.decode(tok("hi")["input_ids"])


def test_chat_template_renders_the_documented_format(micro_models: ModelPair) -> None:
    tok = AutoTokenizer.from_pretrained(micro_models.large.path)
    text = tok.apply_chat_template(CHAT, tokenize=False)
    assert text == (
        "<|bos|><|system|>\nAnswer briefly.<|end|><|user|>\nHow should I brew coffee?<|end|>"
        "<|assistant|>\nArr, matey! Brew it strong.<|end|>"
    )
    assert text == render_chat(CHAT)
    prompt = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == render_chat(CHAT[:2]) + ASSISTANT + "\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert ids[-1] == tok.eos_token_id  # the assistant turn ends with eos
    assert tok.decode(ids) == text


def test_chat_template_refuses_unknown_roles(micro_models: ModelPair) -> None:
    tok = AutoTokenizer.from_pretrained(micro_models.large.path)
    with pytest.raises(Exception, match="unknown role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


# --- CLI -----------------------------------------------------------------------------------


def _run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    bootstrap.add_arguments(parser)
    return bootstrap.run(parser.parse_args(list(argv)))


def test_cli_builds_then_hits_the_cache(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    assert _run_cli("--home", str(home), "--recipe", "micro", "--json") == 0
    first = json.loads(capsys.readouterr().out)
    assert first["cache_hit"] is False
    assert first["models"]["large"]["path"] == str(home / "models" / "large")
    assert first["models"]["large"]["num_parameters"] > first["models"]["small"]["num_parameters"]
    assert _run_cli("--home", str(home), "--recipe", "micro") == 0
    out = capsys.readouterr().out
    assert "cache hit" in out and "fedpersona-micro-large" in out


def test_cli_home_from_env_and_corpus_option(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FEDPERSONA_HOME", str(tmp_path / "envhome"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("ROMEO:\nBut soft, what light through yonder window breaks?\n\n" * 40)
    assert _run_cli("--recipe", "micro", "--corpus", str(corpus), "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["models"]["small"]["path"] == str(tmp_path / "envhome" / "models" / "small")


def test_cli_reports_bad_corpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run_cli("--home", str(tmp_path), "--corpus", str(tmp_path / "missing.txt")) == 2
    assert "missing.txt: not found" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("hi")
    assert _run_cli("--home", str(tmp_path), "--recipe", "micro", "--corpus", str(short)) == 2
    assert "too short" in capsys.readouterr().err


def _build_in_child(out_dir: str) -> bool:
    return build_models(Path(out_dir), MICRO, progress=False).cache_hit


@pytest.mark.slow
def test_parallel_builders_do_not_collide(tmp_path: Path) -> None:
    # Two processes (like two pytest sessions) build into one directory at once: one builds,
    # the other waits on the lock and finds the cache.
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(2) as pool:
        hits = pool.map(_build_in_child, [str(tmp_path)] * 2)
    assert sorted(hits) == [False, True]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "large", "small"]
    assert read_marker(tmp_path / "large") is not None


@pytest.mark.slow
def test_fedpersona_command_twice_builds_then_hits_the_cache(tmp_path: Path) -> None:
    # The acceptance check at MICRO size, through the real `fedpersona` entry point.
    import subprocess
    import sys

    command = [sys.executable, "-m", "fedpersona", "models", "bootstrap", "--recipe", "micro"]
    command += ["--home", str(tmp_path), "--json"]
    results, weights = [], []
    for _ in range(2):
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode == 0, done.stderr
        results.append(json.loads(done.stdout))
        weights.append((tmp_path / "models" / "large" / "model.safetensors").read_bytes())
    assert [r["cache_hit"] for r in results] == [False, True]
    assert weights[0] == weights[1]
