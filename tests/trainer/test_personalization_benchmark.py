"""`benchmarks/personalization.py --quick` end to end on the micro model (real Flower runs)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
from fedpersona.trainer.commands.eval import evaluable_methods
from fedpersona.trainer.models.basemodel import ModelPair

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "personalization.py"


def _load() -> Any:
    spec = importlib.util.spec_from_file_location("personalization_benchmark", BENCHMARK)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.flower
@pytest.mark.slow
def test_quick_mode_runs_the_protocol(tmp_path: Path, micro_models: ModelPair) -> None:
    bench = _load()
    argv = [
        "--population", "pydocs", "--quick", "--users", "2",
        "--base-model", str(micro_models.large.path),
        "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--cpus", "1",
    ]  # fmt: skip
    assert bench.main(argv) == 0
    result = json.loads((tmp_path / "out" / "personalization-pydocs-quick.json").read_text())
    methods = list(evaluable_methods())
    assert set(result["mean_perplexity"]) == set(methods)
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
    # PFTT ships bfloat16: FedAvg's computed float32 uplink is the measured one, and the
    # ratio against a FedAvg in the same dtype is reported beside the measured ratio.
    uplink = result["uplink"]
    assert uplink["pftt_wire_dtype"] == "bfloat16"
    assert uplink["fedavg_float32_computed"] == result["uplink_bytes_per_round"]["fedavg"]
    assert uplink["pftt_over_fedavg"] < uplink["pftt_over_fedavg_bfloat16"]
    assert set(result["worst_user_vs_fedavg"]) == set(methods) - {"base", "fedavg"}
    assert result["complete"] and result["settings"]["seeds"] == [0]


@pytest.mark.flower
@pytest.mark.slow
def test_results_are_saved_per_seed_and_a_run_resumes(
    tmp_path: Path, micro_models: ModelPair
) -> None:
    """Each method's comparison is saved as soon as it is measured and the JSON rewritten
    (`complete: false` until the last); `--resume` reuses the saved selection and finished
    methods instead of training them again."""
    bench = _load()
    argv = [
        "--population", "pydocs", "--quick", "--users", "2", "--no-select", "--stem", "p",
        "--convergence-seeds", "0",
        "--base-model", str(micro_models.large.path),
        "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--cpus", "1",
    ]  # fmt: skip
    assert bench.main(argv) == 0
    first = json.loads((tmp_path / "out" / "p.json").read_text())
    assert first["complete"] and not any(first["convergence"].values())
    seed_file = tmp_path / "work" / "pydocs-quick" / "final" / "seed-0" / "comparison-pftt.json"
    runs_before = json.loads(seed_file.read_text())["runs"]
    (tmp_path / "out" / "p.json").unlink()
    assert bench.main([*argv, "--resume"]) == 0
    again = json.loads((tmp_path / "out" / "p.json").read_text())
    assert again["mean_perplexity"] == first["mean_perplexity"]
    assert json.loads(seed_file.read_text())["runs"] == runs_before  # nothing retrained
    # The per-round curve of a saved run, measured afterwards: the last round is the final one.
    assert bench.main([*argv, "--report-only", "--add-curves", "pftt"]) == 0
    curves = json.loads((tmp_path / "out" / "p.json").read_text())["convergence"]
    assert list(curves["pftt"]) == ["1", "2"] and not curves["fedavg"]
    assert curves["pftt"]["2"] == pytest.approx(again["mean_perplexity"]["pftt"])


def test_methods_subset_reports_targets_it_cannot_judge_as_not_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--methods` picks a subset (in the targets' order); an unknown name stops the run before
    anything is written; a target that compares an omitted method is "not run", never met, and
    one whose methods are asked but not measured yet is not judged at all. No training."""
    from fedpersona.trainer.commands.eval import Comparison

    bench = _load()
    available = evaluable_methods()
    assert bench.parse_methods(None, available)[:4] == ["base", "fedavg", "pftt", "perfit"]
    assert sorted(bench.parse_methods(None, available)) == sorted(available)
    assert bench.parse_methods("pftt, fedavg,base,pftt", available) == ["base", "fedavg", "pftt"]
    with pytest.raises(ValueError, match="nope"):
        bench.parse_methods("fedavg,nope", available)
    with pytest.raises(SystemExit) as stopped:
        bench.main(["--population", "pydocs", "--methods", "fedavg,nope", "--work", str(tmp_path)])
    assert stopped.value.code == 2 and not any(tmp_path.iterdir())

    users = ["a", "b"]
    run = Comparison(
        users=users,
        perplexity={"base": {"a": 30.0, "b": 40.0}, "fedavg": {"a": 20.0, "b": 20.0}},
        uplink_bytes_per_round={"fedavg": 1000.0, "pftt": 400.0},
        downlink_bytes_per_round={"fedavg": 1000.0, "pftt": 800.0},
        train_seconds={"fedavg": 1.0, "pftt": 1.0},
        convergence={"fedavg": {}, "pftt": {}},
    )
    run.perplexity["pftt"] = {"a": 17.0, "b": 18.0}  # 12.5% below FedAvg
    common = {
        "users": users,
        "settings": {"seeds": [0]},
        "selection": {"chosen": {}},
        "fedavg_at": {"float32": 1000.0, "bfloat16": 500.0},
        "wire_dtype": "bfloat16",
    }
    result = bench.report([run], methods=["base", "fedavg", "pftt"], **common)
    assert result["targets_met"] == {
        "pftt_10pct_below_fedavg": True,
        "pftt_uplink_at_most_half_fedavg": True,
    }
    assert result["targets_not_run"]["perfit_10pct_below_fedavg"] == ["perfit"]
    assert result["targets_not_run"]["both_below_local"] == ["perfit", "local"]
    assert set(result["targets_met"]).isdisjoint(result["targets_not_run"])
    result["complete"] = True
    bench.print_table(result, ["base", "fedavg", "pftt"], users)
    printed = capsys.readouterr().out
    assert "MET    pftt_10pct_below_fedavg" in printed
    assert "NOT RUN best_23pct_below_fedavg (needs perfit)" in printed
    assert "MISSED" not in printed and "MET    best_23" not in printed
    # Asked for but not measured yet (a run cut short): neither judged nor "not run".
    pending = bench.report([run], methods=["base", "fedavg", "pftt", "perfit"], **common)
    assert "perfit_10pct_below_fedavg" not in pending["targets_met"]
    assert "perfit_10pct_below_fedavg" not in pending["targets_not_run"]


def test_learning_rate_grid_gives_every_method_the_same_candidates() -> None:
    """`--grid lr`: each trainable method of the headline comparison is searched over the same
    learning rates; a candidate's `lr` goes to the run's settings, never to the method's own
    options (which `get_method` would reject). No training."""
    from fedpersona.trainer.methods import get_method

    bench = _load()
    grid = bench.GRIDS["lr"]
    assert set(grid) == {"fedavg", "pftt", "perfit", "local", "fedavg-ft"}
    for method, candidates in grid.items():
        assert sorted(c["lr"] for c in candidates) == sorted(bench.LR_CANDIDATES), method
        for candidate in candidates:
            spec_update, options = bench.split_options(bench.resolve(candidate, 8))
            assert spec_update == {"lr": candidate["lr"]}
            assert "lr" not in options
            get_method(method, **options)  # the method accepts what is left
    assert bench.split_options({"personal_round": True}) == ({}, {"personal_round": True})
