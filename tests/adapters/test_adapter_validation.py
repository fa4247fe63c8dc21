"""`validate_adapter_dir`: every way an adapter can be unservable gives a clear refusal.

Hand-edited files cover each field; real PEFT writes the DoRA, bias and modules_to_save cases,
so the checks are tested against the files PEFT really produces.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from factories_adapters import BASE, make_adapter, tiny_llama
from fedpersona.adapters import InvalidAdapter, validate_adapter, validate_adapter_dir
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    from fedpersona.adapters import save_lora

    return save_lora(make_adapter(seed=2, r=4, targets=("q_proj", "v_proj")), tmp_path / "a")


def edit_config(path: Path, **changes: object) -> None:
    config = json.loads((path / CONFIG).read_text())
    for key, value in changes.items():
        if value is ...:
            config.pop(key, None)
        else:
            config[key] = value
    (path / CONFIG).write_text(json.dumps(config))


def edit_weights(path: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(path / WEIGHTS)
    change(tensors)
    save_file(tensors, path / WEIGHTS)


def test_valid_adapter_passes(adapter_dir: Path) -> None:
    adapter = validate_adapter_dir(adapter_dir, max_rank=4, base_model=BASE)
    assert adapter.r == 4
    assert validate_adapter_dir(adapter_dir, max_rank=16, base_model=None).r == 4


@pytest.mark.parametrize(
    ("changes", "file", "message"),
    [
        ({"peft_type": "LOHA"}, CONFIG, "'peft_type' must be \"LORA\""),
        ({"peft_type": ...}, CONFIG, "'peft_type'"),
        ({"use_dora": True}, CONFIG, "'use_dora'.*DoRA"),
        ({"bias": "all"}, CONFIG, "'bias'"),
        ({"bias": "lora_only"}, CONFIG, "'bias'"),
        ({"lora_bias": True}, CONFIG, "'lora_bias'"),
        ({"modules_to_save": ["lm_head"]}, CONFIG, "'modules_to_save'"),
        ({"rank_pattern": {"q_proj": 2}}, CONFIG, "'rank_pattern'"),
        ({"alpha_pattern": {"q_proj": 2}}, CONFIG, "'alpha_pattern'"),
        ({"layers_to_transform": [0]}, CONFIG, "'layers_to_transform'"),
        ({"fan_in_fan_out": True}, CONFIG, "'fan_in_fan_out'"),
        ({"init_lora_weights": "pissa"}, CONFIG, "'init_lora_weights'"),
        ({"r": ...}, CONFIG, "required field 'r'"),
        ({"r": "4"}, CONFIG, "'r' must be a positive integer"),
        ({"r": 0}, CONFIG, "'r' must be a positive integer"),
        ({"lora_alpha": -1}, CONFIG, "'lora_alpha'"),
        ({"lora_alpha": float("inf")}, CONFIG, "'lora_alpha'"),
        ({"target_modules": "q_proj|v_proj"}, CONFIG, "'target_modules'.*regex"),
        ({"target_modules": []}, CONFIG, "'target_modules'"),
        ({"target_modules": ["q_proj"]}, WEIGHTS, "'v_proj' is not in target_modules"),
        ({"base_model_name_or_path": ...}, CONFIG, "'base_model_name_or_path'"),
        ({"base_model_name_or_path": "other-model"}, CONFIG, "'base_model_name_or_path'.*other"),
        ({"use_rslora": "yes"}, CONFIG, "'use_rslora'"),
        ({"r": 8}, WEIGHTS, "disagree with r=8"),
    ],
)
def test_bad_config_fields(
    adapter_dir: Path, changes: dict[str, object], file: str, message: str
) -> None:
    edit_config(adapter_dir, **changes)
    with pytest.raises(InvalidAdapter, match=message) as info:
        validate_adapter_dir(adapter_dir, max_rank=16, base_model=BASE)
    assert file in str(info.value)


def test_rank_above_maximum(adapter_dir: Path) -> None:
    with pytest.raises(InvalidAdapter, match=r"'r'=4 is above the configured maximum rank 2"):
        validate_adapter_dir(adapter_dir, max_rank=2, base_model=BASE)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(InvalidAdapter, match="not a directory"):
        validate_adapter_dir(tmp_path / "nope", max_rank=16, base_model=BASE)


@pytest.mark.parametrize("file", [CONFIG, WEIGHTS])
def test_missing_file(adapter_dir: Path, file: str) -> None:
    (adapter_dir / file).unlink()
    with pytest.raises(InvalidAdapter, match=f"{file}: missing"):
        validate_adapter_dir(adapter_dir, max_rank=16, base_model=BASE)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff\xfe"])
def test_unparsable_config(adapter_dir: Path, text: str) -> None:
    (adapter_dir / CONFIG).write_bytes(text.encode("latin-1"))
    with pytest.raises(InvalidAdapter, match=CONFIG):
        validate_adapter_dir(adapter_dir, max_rank=16, base_model=BASE)


@pytest.mark.parametrize("cut", [0, 7, 100, -1])
def test_corrupt_weights(adapter_dir: Path, cut: int) -> None:
    data = (adapter_dir / WEIGHTS).read_bytes()
    (adapter_dir / WEIGHTS).write_bytes(data[:cut] if cut >= 0 else data[: len(data) // 2])
    with pytest.raises(InvalidAdapter, match=f"{WEIGHTS}: not a readable safetensors file"):
        validate_adapter_dir(adapter_dir, max_rank=16, base_model=BASE)


def test_garbage_weights(adapter_dir: Path) -> None:
    (adapter_dir / WEIGHTS).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(InvalidAdapter, match=WEIGHTS):
        validate_adapter_dir(adapter_dir, max_rank=16, base_model=BASE)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights(adapter_dir: Path, value: float) -> None:
    def poison(tensors: dict[str, torch.Tensor]) -> None:
        key = sorted(tensors)[1]
        tensors[key][0, 0] = value

    edit_weights(adapter_dir, poison)
    with pytest.raises(InvalidAdapter, match=f"{WEIGHTS} tensor .* NaN or Inf"):
        validate_adapter_dir(adapter_dir, max_rank=16, base_model=BASE)


def test_shapes_disagreeing_with_each_other(adapter_dir: Path) -> None:
    def shrink(tensors: dict[str, torch.Tensor]) -> None:
        key = next(k for k in sorted(tensors) if k.endswith("lora_B.weight"))
        tensors[key] = tensors[key][:, :3].contiguous()

    edit_weights(adapter_dir, shrink)
    with pytest.raises(InvalidAdapter, match=f"{WEIGHTS}.*disagree with r=4"):
        validate_adapter_dir(adapter_dir, max_rank=16, base_model=BASE)


def test_extra_non_lora_tensor(adapter_dir: Path) -> None:
    head = "base_model.model.lm_head.weight"
    edit_weights(adapter_dir, lambda t: t.update({head: torch.ones(2)}))
    with pytest.raises(InvalidAdapter, match=r"lm_head\.weight.*modules_to_save"):
        validate_adapter_dir(adapter_dir, max_rank=16, base_model=BASE)


def test_in_memory_validation_names_its_source() -> None:
    adapter = make_adapter(seed=1, r=8)
    with pytest.raises(InvalidAdapter, match=r"^adapter: adapter_config.json field 'r'=8"):
        validate_adapter(adapter, max_rank=4, base_model=None)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"bias": "lora_only"}, "'bias'"),
        ({"bias": "all"}, "'bias'"),
        ({"modules_to_save": ["lm_head"]}, "'modules_to_save'"),
    ],
)
def test_real_peft_features_vllm_refuses(
    tmp_path: Path, config: dict[str, object], message: str
) -> None:
    model = tiny_llama(seed=0)
    model.name_or_path = BASE
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], **config)  # type: ignore[arg-type]
    get_peft_model(model, lora).save_pretrained(str(tmp_path), save_embedding_layers=False)
    with pytest.raises(InvalidAdapter, match=message):
        validate_adapter_dir(tmp_path, max_rank=16, base_model=BASE)


def test_real_peft_plain_lora_passes(tmp_path: Path) -> None:
    model = tiny_llama(seed=0)
    model.name_or_path = BASE
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    get_peft_model(model, lora).save_pretrained(str(tmp_path), save_embedding_layers=False)
    adapter = validate_adapter_dir(tmp_path, max_rank=4, base_model=BASE)
    assert adapter.target_modules == ("down_proj", "q_proj")
