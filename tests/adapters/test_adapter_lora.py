"""`LoraAdapter` and its PEFT files: round trips, real PEFT on both sides, structural checks."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from factories_adapters import (
    BASE,
    logits,
    make_adapter,
    module_path,
    random_tokens,
    tiny_llama,
    with_deltas,
)
from fedpersona.adapters import InvalidAdapter, LoraAdapter, load_lora, save_lora
from peft import LoraConfig, PeftModel, get_peft_model


def peft_model(*, r: int, targets: list[str], seed: int, **config: object) -> Any:
    """A tiny Llama wrapped by real PEFT with random (non-zero) LoRA weights."""
    model = tiny_llama(seed=0)
    # PEFT records the wrapped model's name_or_path as base_model_name_or_path.
    model.name_or_path = BASE
    torch.manual_seed(seed)
    lora = LoraConfig(
        r=r,
        lora_alpha=3 * r,
        target_modules=targets,
        lora_dropout=0.0,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
        **config,  # type: ignore[arg-type]
    )
    return get_peft_model(model, lora).eval()


def test_save_load_round_trip(tmp_path: Path) -> None:
    adapter = make_adapter(seed=3, r=4, targets=("q_proj", "down_proj"), alpha=5.0)
    save_lora(adapter, tmp_path / "a")
    loaded = load_lora(tmp_path / "a")
    assert (loaded.r, loaded.alpha, loaded.base_model) == (4, 5.0, BASE)
    assert loaded.target_modules == ("down_proj", "q_proj")
    assert loaded.tensors.keys() == adapter.tensors.keys()
    for key, tensor in adapter.tensors.items():
        assert torch.equal(loaded.tensors[key], tensor)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["bias"] == "none"
    assert config["use_dora"] is False
    assert config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == BASE
    assert not config["modules_to_save"]


def test_saving_is_deterministic(tmp_path: Path) -> None:
    adapter = make_adapter(seed=3, r=2)
    for name in ("a", "b"):
        save_lora(adapter, tmp_path / name)
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()


def test_keys_use_peft_names() -> None:
    adapter = make_adapter(seed=1, r=2, targets=("q_proj",), layers=[0])
    assert set(adapter.tensors) == {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
    }
    assert list(adapter.modules()) == [module_path(0, "q_proj")]


@pytest.mark.parametrize(
    ("r", "targets", "extra"),
    [
        (2, ["q_proj", "v_proj"], {}),
        (4, ["o_proj", "gate_proj", "down_proj"], {}),
        (8, ["k_proj", "up_proj"], {"use_rslora": True}),
    ],
)
def test_peft_written_adapter_loads_exactly(
    tmp_path: Path, r: int, targets: list[str], extra: dict[str, object]
) -> None:
    model = peft_model(r=r, targets=targets, seed=r, **extra)
    model.save_pretrained(str(tmp_path), save_embedding_layers=False)  # no hub lookup
    adapter = load_lora(tmp_path)
    assert adapter.r == r
    assert set(adapter.target_modules) == set(targets)
    expected_scaling = 3 * r / math.sqrt(r) if extra.get("use_rslora") else 3.0
    assert adapter.scaling == pytest.approx(expected_scaling)
    tokens = random_tokens(0)
    reference = with_deltas(tiny_llama(seed=0), adapter)
    diff = (logits(model, tokens) - logits(reference, tokens)).abs().max().item()
    assert diff < 1e-5


def test_saved_adapter_loads_in_peft(tmp_path: Path) -> None:
    adapter = make_adapter(seed=5, r=4, targets=("q_proj", "v_proj", "up_proj"), alpha=7.0)
    save_lora(adapter, tmp_path)
    model = PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path).eval()
    tokens = random_tokens(1)
    reference = with_deltas(tiny_llama(seed=0), adapter)
    assert (logits(model, tokens) - logits(reference, tokens)).abs().max().item() < 1e-5
    # and the adapter changes the output, so the comparison above is not vacuous
    assert (logits(tiny_llama(seed=0), tokens) - logits(model, tokens)).abs().max().item() > 1e-3


Q = module_path(0, "q_proj")
A_KEY, B_KEY = f"{Q}.lora_A.weight", f"{Q}.lora_B.weight"
UP = module_path(0, "up_proj")


def _pair(r: int = 2, fan_in: int = 8, fan_out: int = 6) -> dict[str, torch.Tensor]:
    return {A_KEY: torch.ones(r, fan_in), B_KEY: torch.ones(fan_out, r)}


def _build(tensors: dict[str, torch.Tensor], **overrides: object) -> LoraAdapter:
    fields: dict[str, object] = {
        "r": 2,
        "alpha": 4.0,
        "target_modules": ("q_proj",),
        "base_model": BASE,
        "tensors": tensors,
    }
    fields.update(overrides)
    return LoraAdapter(**fields)  # type: ignore[arg-type]


def test_well_formed_adapter_builds() -> None:
    adapter = _build(_pair())
    assert adapter.scaling == 2.0
    delta = adapter.delta(Q)
    assert delta.shape == (6, 8)
    assert torch.allclose(delta, torch.full((6, 8), 4.0))


@pytest.mark.parametrize(
    ("drop", "add", "message"),
    [
        (B_KEY, {}, "no lora_B tensor"),
        (A_KEY, {}, "no lora_A tensor"),
        (None, {A_KEY: torch.ones(3, 8)}, "r=2"),
        (None, {B_KEY: torch.ones(6, 3)}, "r=2"),
        (None, {A_KEY: torch.ones(2, 8, 1)}, "matrices"),
        (None, {A_KEY: torch.ones(2, 8).long()}, "floating"),
        (None, {f"{Q}.bias": torch.ones(6)}, "bias"),
        (None, {f"{Q}.lora_magnitude_vector": torch.ones(6)}, "DoRA"),
        (None, {"base_model.model.lm_head.weight": torch.ones(6, 8)}, "modules_to_save"),
        (
            None,
            {f"{UP}.lora_A.weight": torch.ones(2, 8), f"{UP}.lora_B.weight": torch.ones(6, 2)},
            "'up_proj' is not in target_modules",
        ),
    ],
)
def test_malformed_tensors_are_refused(
    drop: str | None, add: dict[str, torch.Tensor], message: str
) -> None:
    tensors = _pair()
    if drop:
        del tensors[drop]
    tensors.update(add)
    with pytest.raises(InvalidAdapter, match=message):
        _build(tensors)


def test_targets_match_like_peft() -> None:
    # full module paths and suffixes are PEFT targets too; a bare substring is not
    assert _build(_pair(), target_modules=("model.layers.0.self_attn.q_proj",)).r == 2
    assert _build(_pair(), target_modules=("self_attn.q_proj",)).r == 2
    with pytest.raises(InvalidAdapter, match="not in target_modules"):
        _build(_pair(), target_modules=("proj",))


def test_no_tensors_is_refused() -> None:
    with pytest.raises(InvalidAdapter, match="no LoRA tensors"):
        _build({})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"r": 2.0}, "r must be a positive integer"),
        ({"alpha": 0}, "lora_alpha must be positive"),
        ({"alpha": float("nan")}, "lora_alpha must be positive"),
        ({"target_modules": ()}, "target_modules"),
        ({"base_model": ""}, "base_model"),
    ],
)
def test_bad_fields_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidAdapter, match=message):
        _build(_pair(), **overrides)
