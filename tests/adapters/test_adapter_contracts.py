"""The shared contracts `adapters/` owns: home layout, model manifests, names, ids, rank limits.

Pure checks plus the one import-time property the gateway relies on: the read side of the
package imports without torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fedpersona.adapters import (
    EXPERT_MAX_RANK,
    MAX_LORA_RANK,
    ExpertRef,
    Home,
    InvalidManifest,
    InvalidName,
    ModelManifest,
    RankLimitMismatch,
    Slot,
    check_engine_adapter_name,
    check_engine_rank,
    check_version_id,
    engine_adapter_name,
    proxy_xargs,
    read_model_manifest,
    resolve_home,
    write_model_manifest,
)
from fedpersona.adapters.limits import VLLM_LORA_RANKS
from fedpersona.adapters.manifest import MANIFEST_FILE, model_name
from fedpersona.adapters.refs import ALPHA_ARG, EXPERT_ARG, parse_engine_adapter_name
from hypothesis import given
from hypothesis import strategies as st

VID = "0123456789abcdef"
READ_SIDE = (
    "fedpersona.adapters",
    "fedpersona.adapters.errors",
    "fedpersona.adapters.home",
    "fedpersona.adapters.limits",
    "fedpersona.adapters.manifest",
    "fedpersona.adapters.names",
    "fedpersona.adapters.refs",
    "fedpersona.adapters.store",
    "fedpersona.adapters.version",
    "fedpersona.adapters.durable",
)


def test_read_side_imports_without_torch(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in READ_SIDE)
        + "from fedpersona.adapters import AdapterStore, Slot, read_model_manifest\n"
        + f"AdapterStore({str(tmp_path / 'store')!r}, read_only=True).current_id("
        + "Slot.user_served('alice'))\n"
        + "print(sorted(m for m in ('torch', 'safetensors', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stderr


def test_torch_backed_names_still_import_from_the_package() -> None:
    import fedpersona.adapters as adapters
    from fedpersona.adapters.lora import LoraAdapter

    assert adapters.LoraAdapter is LoraAdapter
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        adapters.nope  # noqa: B018


# ------------------------------------------------------------------------------ home


def test_home_layout() -> None:
    home = Home(Path("/srv/fp"))
    assert home.large_model == Path("/srv/fp/models/large")
    assert home.small_model == Path("/srv/fp/models/small")
    assert home.store == Path("/srv/fp/store")
    assert home.registry == Path("/srv/fp/registry.sqlite")
    assert home.runs == Path("/srv/fp/runs")
    assert home.silo("alice") == Path("/srv/fp/silos/alice")
    assert home.logs == Path("/srv/fp/logs")
    with pytest.raises(InvalidName):
        home.silo("../etc")
    with pytest.raises(ValueError, match="unknown model role"):
        home.model("medium")


def test_resolve_home_prefers_explicit_then_env_then_default() -> None:
    env = {"FEDPERSONA_HOME": "/from/env"}
    assert resolve_home(Path("/explicit"), environ=env) == Path("/explicit")
    assert resolve_home(None, environ=env) == Path("/from/env")
    assert resolve_home(None, environ={"FEDPERSONA_HOME": ""}) == Path(".fedpersona")
    assert resolve_home(None, environ={}) == Path(".fedpersona")
    assert Home.resolve(environ=env).store == Path("/from/env/store")


# ------------------------------------------------------------------------------ manifests


def test_manifest_round_trip_keeps_unknown_fields(tmp_path: Path) -> None:
    manifest = ModelManifest.parse(
        {
            "name": "smollm2-135m-instruct",
            "role": "large",
            "architecture": "LlamaForCausalLM",
            "num_parameters": 134_515_008,
            "tokenizer": {"class": "GPT2TokenizerFast", "vocab_size": 49152, "eos_token": "x"},
            "source": {"kind": "gguf", "file": "m.gguf", "sha256": "a" * 64},
            "license": "Apache-2.0",
            "engine": {"max_model_len": 2048, "max_lora_rank": 16, "dtype": "bfloat16"},
            "recipe": {"steps": 3},  # a builder's own field
        }
    )
    path = write_model_manifest(tmp_path, manifest)
    assert path == tmp_path / MANIFEST_FILE
    assert [p.name for p in tmp_path.iterdir()] == [MANIFEST_FILE]  # no temp file left
    on_disk = json.loads(path.read_text())
    assert (
        on_disk["recipe"] == {"steps": 3} and on_disk["tokenizer"]["class"] == "GPT2TokenizerFast"
    )
    assert "recipe_hash" not in on_disk  # unset fields are left out
    again = read_model_manifest(tmp_path)
    assert again == manifest and again.tokenizer is not None
    assert again.tokenizer.class_name == "GPT2TokenizerFast"
    assert model_name(tmp_path) == "smollm2-135m-instruct"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "field 'name': Field required"),
        ({"name": ""}, "field 'name'"),
        ({"name": "has space"}, "field 'name'"),
        ({"name": "m", "role": "medium"}, "field 'role'"),
        ({"name": "m", "num_parameters": -1}, "field 'num_parameters'"),
        ({"name": "m", "source": {"sha256": "xyz"}}, "field 'source.sha256'"),
        ({"name": "m", "engine": {"max_lora_rank": 12}}, "field 'engine.max_lora_rank'"),
        ({"name": "m", "engine": {"gpu_memory_utilization": 2}}, "engine.gpu_memory_utilization"),
        (["name"], "field '\\(document\\)'"),
    ],
)
def test_invalid_manifests_name_the_field(tmp_path: Path, data: object, message: str) -> None:
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(InvalidManifest, match=message) as caught:
        read_model_manifest(tmp_path)
    assert str(tmp_path / MANIFEST_FILE) in str(caught.value)


def test_missing_or_broken_manifest_is_refused_not_guessed(tmp_path: Path) -> None:
    with pytest.raises(InvalidManifest, match=r"fedpersona\.json is missing"):
        model_name(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):  # InvalidManifest is a ValueError
        model_name(tmp_path)


# ------------------------------------------------------------------------------ ids and names


def test_version_ids() -> None:
    assert check_version_id(VID) == VID
    for bad in ("0123456789ABCDEF", "0123", VID + "0", "g123456789abcdef", 123, None):
        with pytest.raises(InvalidName, match="expected 16 lower-case hex digits"):
            check_version_id(bad)


def test_engine_adapter_names() -> None:
    name = engine_adapter_name("al-ice", VID)
    assert name == f"u-al-ice-{VID}"
    assert parse_engine_adapter_name(name) == ("al-ice", VID)
    assert check_engine_adapter_name("al-ice", name) == name
    with pytest.raises(InvalidName, match="does not belong"):
        check_engine_adapter_name("al", name)  # `u-al-` is a prefix of al-ice's names
    for bad in (f"u-alice-{VID[:-1]}", f"alice-{VID}", f"u--{VID}", f"u-Al-{VID}", "u-a", 7):
        with pytest.raises(InvalidName):
            parse_engine_adapter_name(bad)
    with pytest.raises(InvalidName):
        engine_adapter_name("../x", VID)


@given(
    user=st.from_regex(r"[a-z0-9][a-z0-9_-]{0,62}", fullmatch=True),
    vid=st.from_regex(r"[0-9a-f]{16}", fullmatch=True),
)
def test_engine_names_parse_back(user: str, vid: str) -> None:
    assert parse_engine_adapter_name(engine_adapter_name(user, vid)) == (user, vid)


def test_expert_refs_and_xargs() -> None:
    ref = ExpertRef.parse(f"users/alice/expert@{VID}")
    assert ref == ExpertRef(Slot.user_expert("alice"), VID)
    assert str(ExpertRef(Slot.global_expert(), VID)) == f"global/expert@{VID}"
    assert proxy_xargs(ref, alpha=1) == {EXPERT_ARG: f"users/alice/expert@{VID}", ALPHA_ARG: 1.0}
    assert (EXPERT_ARG, ALPHA_ARG) == ("fedpersona_expert", "fedpersona_alpha")
    with pytest.raises(InvalidName, match="not an expert slot"):
        ExpertRef(Slot.user_served("alice"), VID)
    with pytest.raises(InvalidName, match=r"fedpersona_expert .*hex digits"):
        ExpertRef.parse("global/expert@0123")


# ------------------------------------------------------------------------------ rank limits


def test_rank_limits() -> None:
    assert MAX_LORA_RANK in VLLM_LORA_RANKS and EXPERT_MAX_RANK >= MAX_LORA_RANK
    check_engine_rank(store_max_rank=16, engine_max_lora_rank=16)
    check_engine_rank(store_max_rank=8, engine_max_lora_rank=16)
    with pytest.raises(RankLimitMismatch, match=r"up to 32 .*--max-lora-rank 16"):
        check_engine_rank(store_max_rank=32, engine_max_lora_rank=16)
    with pytest.raises(RankLimitMismatch, match="--max-lora-rank 12 is not one vLLM accepts"):
        check_engine_rank(store_max_rank=8, engine_max_lora_rank=12)
