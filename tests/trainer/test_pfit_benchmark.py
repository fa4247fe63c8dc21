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


def _bench():
    spec = importlib.util.spec_from_file_location("bench_pfit", REPO / "benchmarks" / "pfit.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_validation_prompts_are_carved_from_training_and_never_trained_on(tmp_path: Path) -> None:
    bench = _bench()
    silo = tmp_path / "silos" / "ann"
    silo.mkdir(parents=True)
    chats = [json.dumps({"messages": [{"role": "user", "content": f"q{i}"}]}) for i in range(6)]
    (silo / "train.jsonl").write_text("\n".join(chats) + "\n")
    val = bench.carve_validation({"ann": silo}, tmp_path / "val", 2)
    assert (silo / "train.jsonl").read_text().splitlines() == chats[:4]
    assert (val["ann"] / "eval.jsonl").read_text().splitlines() == chats[4:]
    with pytest.raises(ValueError, match="cannot carve"):
        bench.carve_validation({"ann": silo}, tmp_path / "val2", 4)


def test_seeds_are_combined_and_targets_counted_per_seed() -> None:
    bench = _bench()
    from pfit_report import combine, summarize

    mixes = {u: lam for u, (_, lam) in bench.MIXES.items()}

    def scores(shift: float) -> dict:
        row = {"helpfulness": 0.0, "safety": 0.0, "mixed": 0.0, "kl": 0.0}
        out = {m: {u: dict(row) for u in mixes} for m in ("base", "pfit", "shared")}
        for u, lam in mixes.items():
            out["pfit"][u].update(helpfulness=lam, safety=1 - lam, mixed=1.0 + shift)
        return out

    per_seed = {
        s: summarize(scores(shift), mixes=mixes, uplink={"pfit": 1.0, "fedrlhf": 4.0},
                     reward_models=[])
        for s, shift in ((0, -2.0), (1, 0.0), (2, 0.5))
    }  # fmt: skip
    result = combine(per_seed, mixes)
    assert result["seeds"] == [0, 1, 2]
    assert result["per_user"]["pfit"]["safe"]["mixed"] == pytest.approx(0.5)
    assert result["targets"]["mixed_reward_pfit_above_shared"]["safe"] is True
    assert result["targets_held_in_seeds"]["mixed_reward_pfit_above_shared"]["safe"] == 2
    assert result["targets_held_in_seeds"]["lambda0_safer_than_lambda1"] == 3
    assert result["mixed_pfit_minus_shared"]["mixed"] == [-1.0, 1.0, 1.5]


def test_paired_difference_is_per_prompt_with_its_standard_error_over_prompts() -> None:
    _bench()  # puts benchmarks/ on the path
    from pfit_report import paired, pool_paired

    scores = {
        "pfit": {"ann": {"mixed_per_prompt": [1.0, 2.0, 3.0, 4.0]}, "old": {"mixed": 1.0}},
        "shared": {"ann": {"mixed_per_prompt": [0.0, 2.0, 2.0, 4.0]}, "old": {"mixed": 0.0}},
    }
    diff = paired(scores)
    # Differences 1, 0, 1, 0: mean 0.5, sd 0.577, se 0.289; users without per-prompt means
    # (results written before they were kept) are left out, not guessed.
    assert set(diff) == {"ann"}
    assert diff["ann"]["mean"] == pytest.approx(0.5)
    assert diff["ann"]["se"] == pytest.approx(0.5773503 / 2)
    assert diff["ann"]["prompts"] == 4
    pooled = pool_paired([{"ann": {"mean": 0.1, "se": 0.3}}, {"ann": {"mean": -0.1, "se": 0.4}}])
    assert pooled["ann"]["mean"] == pytest.approx(0.0)
    assert pooled["ann"]["se_eval"] == pytest.approx(0.25)  # sqrt(0.09 + 0.16) / 2
    assert pooled["ann"]["seed_sd"] == pytest.approx(0.1414214)
    assert pool_paired([]) == {}
