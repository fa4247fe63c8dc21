"""Local LoRA training against real PEFT: key names, saved files, joint adapters, masks, seeds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fedpersona.adapters import compose, load_lora, save_lora
from fedpersona.trainer.data import personas
from fedpersona.trainer.data.silo import collate, load_examples
from fedpersona.trainer.errors import MethodError
from fedpersona.trainer.learn.evaluate import merge_adapter
from fedpersona.trainer.learn.lora_train import LocalTrainer, LoraSession, load_base_model
from fedpersona.trainer.methods import LoraSpec, TrainConfig
from fedpersona.trainer.models.basemodel import ModelPair
from peft import PeftModel

SPEC = LoraSpec(rank=4, alpha=8.0)
CONFIG = TrainConfig(steps=3, lr=1e-2, batch_size=4, max_len=96, seed=0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def silo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("silos")
    return personas.write_silos(root, {"carol": "chef"}, n_train=6, n_eval=2)["carol"]


def _logits(model: torch.nn.Module, session: LoraSession, silo: Path) -> torch.Tensor:
    examples = load_examples(silo, "eval", session.tokenizer, max_len=96)
    batch = collate(examples, pad_id=session.pad_id)
    model.eval()
    with torch.no_grad():
        out: torch.Tensor = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).logits
    return out


def _trained(micro_models: ModelPair, silo: Path, specs: dict[str, LoraSpec]) -> LoraSession:
    session = LoraSession(micro_models.large, specs, seed=1)
    examples = load_examples(silo, "train", session.tokenizer, max_len=96)
    trainer = LocalTrainer(session, examples, config=CONFIG, adapters=list(specs), order_seed=(0,))
    trainer.run(CONFIG.steps)
    return session


def test_params_use_peft_key_names_and_round_trip(micro_models: ModelPair) -> None:
    session = LoraSession(micro_models.large, {"main": SPEC}, seed=0)
    params = session.read("main")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in params
    assert len(params) == 2 * 4 * 2  # A and B x 4 modules x 2 layers
    assert params["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (
        4,
        128,
    )
    assert not params["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].any()
    changed = {k: v + 1.0 for k, v in params.items()}
    session.write("main", changed)
    assert all(np.array_equal(session.read("main")[k], changed[k]) for k in params)
    # the same seed gives the same initialization, another seed another one
    same = LoraSession(micro_models.large, {"main": SPEC}, seed=0).read("main")
    other = LoraSession(micro_models.large, {"main": SPEC}, seed=1).read("main")
    assert all(np.array_equal(same[k], params[k]) for k in params)
    assert not all(np.array_equal(other[k], params[k]) for k in params)
    with pytest.raises(MethodError, match="do not match"):
        session.write("main", {k: v for k, v in list(params.items())[1:]})
    key = next(iter(params))
    with pytest.raises(MethodError, match="shape"):
        session.write("main", {**params, key: np.zeros((3, 3), np.float32)})


def test_saved_adapter_loads_in_peft_and_computes_the_same_model(
    micro_models: ModelPair, silo: Path, tmp_path: Path
) -> None:
    session = _trained(micro_models, silo, {"main": SPEC})
    adapter = session.adapter("main")
    assert adapter.base_model == micro_models.large.name
    assert any(t.abs().sum() > 0 for k, t in adapter.tensors.items() if "lora_B" in k)
    save_lora(adapter, tmp_path / "a")
    assert load_lora(tmp_path / "a").tensors.keys() == adapter.tensors.keys()
    reloaded = PeftModel.from_pretrained(load_base_model(micro_models.large), str(tmp_path / "a"))
    torch.testing.assert_close(
        _logits(reloaded, session, silo), _logits(session.model, session, silo)
    )
    merged = load_base_model(micro_models.large)
    merge_adapter(merged, adapter)
    torch.testing.assert_close(
        _logits(merged, session, silo), _logits(session.model, session, silo), atol=1e-4, rtol=1e-4
    )


def test_jointly_trained_adapters_equal_their_composition(
    micro_models: ModelPair, silo: Path
) -> None:
    specs = {"global": SPEC, "personal": LoraSpec(rank=2, alpha=2.0)}
    session = _trained(micro_models, silo, specs)
    served = compose(session.adapter("global"), session.adapter("personal"))
    assert served.r == 6
    merged = load_base_model(micro_models.large)
    merge_adapter(merged, served)
    torch.testing.assert_close(
        _logits(merged, session, silo), _logits(session.model, session, silo), atol=1e-4, rtol=1e-4
    )


def test_training_is_deterministic(micro_models: ModelPair, silo: Path) -> None:
    first = _trained(micro_models, silo, {"main": SPEC}).read("main")
    second = _trained(micro_models, silo, {"main": SPEC}).read("main")
    assert all(np.array_equal(first[k], second[k]) for k in first)


def test_masks_freeze_pruned_entries_at_zero_and_importance_follows(
    micro_models: ModelPair, silo: Path
) -> None:
    session = LoraSession(micro_models.large, {"main": SPEC}, seed=0)
    examples = load_examples(silo, "train", session.tokenizer, max_len=96)
    trainer = LocalTrainer(session, examples, config=CONFIG, adapters=["main"], order_seed=(0,))
    trainer.run(2)
    rng = np.random.default_rng(0)
    masks = {
        k: (rng.random(v.shape) < 0.5).astype(np.float32) for k, v in session.read("main").items()
    }
    trainer.set_masks({"main": masks})
    before = session.read("main")
    trainer.run(3)
    after = session.read("main")
    for key, mask in masks.items():
        assert not after[key][mask == 0].any()
    assert any(not np.array_equal(after[k][masks[k] == 1], before[k][masks[k] == 1]) for k in masks)
    scores = trainer.importance("main", batches=2)
    assert scores.keys() == masks.keys()
    for key, mask in masks.items():
        assert scores[key].shape == mask.shape and (scores[key] >= 0).all()
        assert not scores[key][mask == 0].any()
    assert any(scores[k].any() for k in scores)
    assert session.read("main").keys() == after.keys()
    assert all(
        np.array_equal(session.read("main")[k], after[k]) for k in after
    )  # importance: no step


def test_unknown_target_modules_and_caller_random_state(micro_models: ModelPair) -> None:
    with pytest.raises(MethodError, match="not found"):
        LoraSession(micro_models.large, {"main": LoraSpec(2, 4.0, ("no_such_proj",))}, seed=0)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    LoraSession(micro_models.large, {"main": SPEC}, seed=0)
    assert torch.equal(torch.rand(3), expected)  # the session's seeding is private
