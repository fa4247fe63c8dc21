"""`benchmarks/personalization.py --quick` end to end on the micro model (real Flower runs)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from fedpersona.trainer.commands.eval import evaluable_methods
from fedpersona.trainer.models.basemodel import ModelPair

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "personalization.py"


@pytest.mark.flower
@pytest.mark.slow
def test_quick_mode_runs_the_protocol(tmp_path: Path, micro_models: ModelPair) -> None:
    spec = importlib.util.spec_from_file_location("personalization_benchmark", BENCHMARK)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = [
        "--population", "pydocs", "--quick", "--users", "2",
        "--base-model", str(micro_models.large.path),
        "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--cpus", "1",
    ]  # fmt: skip
    assert bench.main(argv) == 0
    result = json.loads((tmp_path / "out" / "personalization-pydocs-quick.json").read_text())
    methods = list(evaluable_methods())
    assert list(result["mean_perplexity"]) == methods
    assert {"fedavg-ft", "fedsa"} <= set(methods)
    users = result["settings"]["users"]
    assert len(users) == 2
    for method in methods:
        assert set(result["per_user_perplexity"][method]) == set(users)
    # Chosen on validation: one score per candidate, the chosen one the lowest.
    scores = result["selection"]["validation"]["pftt"]
    best = min(scores, key=lambda s: s["validation_ppl"])
    assert result["selection"]["chosen"]["pftt"] == best["options"]
    # Every trained method has a per-round curve; the personalization round uploads nothing,
    # so PFTT's uplink per federated round is that of its global LoRA.
    assert all(result["convergence"][m] for m in methods if m != "base")
    assert result["uplink_bytes_per_round"]["local"] == 0
    assert 0 < result["uplink_bytes_per_round"]["pftt"] < result["uplink_bytes_per_round"]["fedavg"]
    assert set(result["targets_met"]) >= {"pftt_uplink_at_most_half_fedavg", "both_below_local"}
    assert (tmp_path / "out" / "personalization-pydocs-quick.png").is_file()
    assert (tmp_path / "out" / "personalization-pydocs-quick-convergence.png").is_file()
