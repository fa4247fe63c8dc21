"""Client state cannot leak between runs, nor across base models and method settings (a
mismatched state is reset with a warning, never loaded)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from fedpersona.trainer.flower.client_state import ClientState, binding_of
from fedpersona.trainer.methods import LoraSpec, get_method
from fedpersona.trainer.models.basemodel import ModelInfo
from flwr.app import Context, RecordDict

MICRO = ModelInfo(
    path=Path("/m/micro"), name="micro", role="large", recipe_hash="a", num_parameters=1
)
SMOL = ModelInfo(path=Path("/m/smol"), name="smol", role="large", recipe_hash="b", num_parameters=2)
STATE = {"layer.lora_A.weight": np.arange(6, dtype=np.float32).reshape(2, 3)}


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def _state(silo: Path, *, model: ModelInfo = MICRO, resume: bool = True, **options) -> ClientState:  # type: ignore[no-untyped-def]
    method = get_method("pftt", spec=LoraSpec(rank=4, alpha=8.0), **options)
    return ClientState(_context(), silo, "pftt", binding=binding_of(method, model), resume=resume)


def test_a_resumed_run_with_the_same_binding_continues(tmp_path: Path) -> None:
    _state(tmp_path).save(STATE)
    loaded = _state(tmp_path).load()
    assert np.array_equal(loaded["layer.lora_A.weight"], STATE["layer.lora_A.weight"])


def test_a_fresh_run_never_reads_an_earlier_runs_state(tmp_path: Path) -> None:
    _state(tmp_path).save(STATE)
    assert _state(tmp_path, resume=False).load() == {}
    # ...and neither does a fresh run of other settings (what `fedpersona eval` runs).
    assert _state(tmp_path, resume=False, personal_round=True).load() == {}


def test_state_of_another_base_model_resets_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _state(tmp_path).save(STATE)
    with caplog.at_level(logging.WARNING):
        assert _state(tmp_path, model=SMOL).load() == {}
    assert "pftt-state.npz" in caplog.text and "base model 'micro'" in caplog.text
    assert "base model 'smol'" in caplog.text
    # Its first save binds the file to the new model; the old state is gone.
    fresh = _state(tmp_path, model=SMOL)
    fresh.save({})
    assert _state(tmp_path, model=SMOL).load() == {}


def test_state_of_other_method_settings_resets(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _state(tmp_path).save(STATE)
    with caplog.at_level(logging.WARNING):
        assert _state(tmp_path, personal_round=True).load() == {}
    assert "personal_round" in caplog.text


def test_unbound_state_from_an_older_version_resets(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _state(tmp_path).save(STATE)
    (tmp_path / ".fedpersona" / "pftt-state.json").unlink()
    with caplog.at_level(logging.WARNING):
        assert _state(tmp_path).load() == {}
    assert "no binding file" in caplog.text


def test_within_a_run_the_context_wins(tmp_path: Path) -> None:
    state = _state(tmp_path, resume=False)
    state.save(STATE)
    assert np.array_equal(state.load()["layer.lora_A.weight"], STATE["layer.lora_A.weight"])
