"""`benchmarks/pfit.py --quick` end to end on the micro model: JSON, plot, measured targets."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.flower
@pytest.mark.slow
def test_pfit_benchmark_quick(micro_models, tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_pfit", REPO / "benchmarks" / "pfit.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = [
        "--quick", "--base-model", str(micro_models.large.path), "--work", str(tmp_path / "work"),
        "--out", str(tmp_path / "out"), "--cpus", "2", "--rounds", "1", "--steps", "2",
    ]  # fmt: skip
    assert bench.main(argv) == 0
    result = json.loads((tmp_path / "out" / "pfit-quick.json").read_text())
    assert (tmp_path / "out" / "pfit-quick.png").stat().st_size > 0
    users = set(bench.MIXES)
    for model in ("base", "pfit", "shared"):
        assert set(result["per_user"][model]) == users
        for scores in result["per_user"][model].values():
            assert {"helpfulness", "safety", "mixed", "kl"} <= set(scores)
            assert scores["kl"] >= 0
    # The communication target is structural, so it holds even in the quick mode.
    assert result["uplink_ratio_pfit_vs_dense"] <= 0.5
    assert result["targets"]["uplink_ratio_at_most_half"] is True
    for objective in ("helpfulness", "safety"):
        assert 0.5 < result["reward_models"][objective]["heldout_pairwise_accuracy"] <= 1.0
