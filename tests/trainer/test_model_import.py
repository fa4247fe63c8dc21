"""`fedpersona models import`: sources in, served model directories with manifests out.

Fast checks on the MICRO model and on hand-made GGUF files (the real SmolLM2 import runs in
tests/integration/test_real_model.py): a Hugging Face directory is copied with a manifest and a
second import is a cache hit; a corrupt or truncated GGUF, a non-Llama directory, a pinned hash
that does not match and a small model whose tokenizer differs from the large one's are each
refused with a clear error, and nothing is written.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fedpersona.adapters.manifest import read_model_manifest
from fedpersona.trainer.errors import ModelImportError
from fedpersona.trainer.models.basemodel import ModelPair
from fedpersona.trainer.models.importer import import_model, sha256_of
from fedpersona.trainer.models.proxy import same_tokenizer


def _nothing_written(parent: Path) -> bool:
    return not parent.exists() or not any(parent.iterdir())


def test_hf_directory_is_imported_with_a_manifest_and_cached(
    micro_models: ModelPair, tmp_path: Path
) -> None:
    target = tmp_path / "models" / "large"
    first = import_model(micro_models.large.path, target, name="micro-imported", license="mit")
    assert not first.cache_hit
    manifest = read_model_manifest(target)
    assert manifest.name == "micro-imported"
    assert manifest.role == "large"
    assert manifest.architecture == "LlamaForCausalLM"
    assert manifest.license == "mit"
    assert manifest.source is not None and manifest.source.kind == "hf"
    assert manifest.source.sha256 == sha256_of(micro_models.large.path)
    assert manifest.tokenizer is not None and manifest.tokenizer.vocab_size
    assert manifest.num_parameters == micro_models.large.num_parameters
    assert manifest.engine is not None and manifest.engine.max_model_len
    # the weights are the source's, byte for byte
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (target / name).read_bytes() == (micro_models.large.path / name).read_bytes()
    again = import_model(micro_models.large.path, target, name="micro-imported")
    assert again.cache_hit
    assert list(tmp_path.joinpath("models").glob(".*staging*")) == []


def test_non_llama_directory_is_refused_and_nothing_written(
    micro_models: ModelPair, tmp_path: Path
) -> None:
    source = tmp_path / "gpt2ish"
    shutil.copytree(micro_models.large.path, source)
    config = json.loads((source / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelImportError, match="not supported"):
        import_model(source, tmp_path / "out" / "large", name="x")
    assert _nothing_written(tmp_path / "out")


def test_pinned_hash_mismatch_is_refused(micro_models: ModelPair, tmp_path: Path) -> None:
    with pytest.raises(ModelImportError, match="differs from the pinned"):
        import_model(
            micro_models.large.path, tmp_path / "out" / "large", name="x", expected_sha256="0" * 64
        )
    assert _nothing_written(tmp_path / "out")


def _tiny_gguf(path: Path, *, arch: str = "llama") -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b", "c"])
    writer.add_tensor("token_embd.weight", np.arange(3 * 64, dtype=np.float32).reshape(3, 64))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_with_a_bad_magic_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 64)
    with pytest.raises(ModelImportError, match="not a GGUF file"):
        import_model(bad, tmp_path / "out" / "large", name="x")
    assert _nothing_written(tmp_path / "out")


def test_truncated_gguf_is_refused(tmp_path: Path) -> None:
    whole = _tiny_gguf(tmp_path / "whole.gguf")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size - 100])
    with pytest.raises(ModelImportError, match=r"truncated|corrupt"):
        import_model(truncated, tmp_path / "out" / "large", name="x")
    assert _nothing_written(tmp_path / "out")


def test_gguf_of_another_architecture_is_refused(tmp_path: Path) -> None:
    other = _tiny_gguf(tmp_path / "other.gguf", arch="gpt2")
    with pytest.raises(ModelImportError, match="'gpt2' is not supported"):
        import_model(other, tmp_path / "out" / "large", name="x")
    assert _nothing_written(tmp_path / "out")


def test_small_model_with_another_tokenizer_is_refused_by_the_cli(
    micro_models: ModelPair, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    shutil.copytree(micro_models.large.path, home / "models" / "large")
    other = tmp_path / "other-small"
    shutil.copytree(micro_models.small.path, other)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first = next(iter(vocab))
    vocab[first + "-renamed"] = vocab.pop(first)
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert same_tokenizer(micro_models.small.path, micro_models.large.path)
    assert not same_tokenizer(other, home / "models" / "large")

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedpersona",
            "models",
            "import",
            str(other),
            "--home",
            str(home),
            "--role",
            "small",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "tokenizer" in result.stderr and "differs" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (home / "models" / "small").exists()


def test_cli_imports_a_directory_and_reports_json(micro_models: ModelPair, tmp_path: Path) -> None:
    home = tmp_path / "home"
    command = [
        sys.executable,
        "-m",
        "fedpersona",
        "models",
        "import",
        str(micro_models.large.path),
        "--home",
        str(home),
        "--name",
        "my-model",
        "--json",
    ]
    first = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert report["cache_hit"] is False
    assert report["manifest"]["name"] == "my-model"
    assert Path(report["path"]) == home / "models" / "large"
    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert json.loads(second.stdout)["cache_hit"] is True
