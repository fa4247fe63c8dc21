"""`fedpersona eval`'s outputs: comparison JSON (means, traffic) and the PNG chart; and a real
run (Flower simulation) on a base model given by `--base-model`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from fedpersona.adapters import AdapterStore, Slot
from fedpersona.trainer.commands.eval import Comparison, add_arguments, render, run, save
from fedpersona.trainer.data.personas import write_silos
from fedpersona.trainer.models.basemodel import ModelPair


def test_comparison_is_saved_as_json_and_png(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    comparison = Comparison(
        users=["alice", "bob"],
        perplexity={"base": {"alice": 40.0, "bob": 60.0}, "pftt": {"alice": 20.0, "bob": 30.0}},
        uplink_bytes_per_round={"pftt": 1000.0},
        downlink_bytes_per_round={"pftt": 2000.0},
        train_seconds={"pftt": 3.0},
        runs={"pftt": "r-20260101t000000-abcdef"},
    )
    json_path, png_path = save(comparison, tmp_path / "out")
    data = json.loads(json_path.read_text())
    assert data["mean_perplexity"] == {"base": 50.0, "pftt": 25.0}
    assert data["perplexity"]["pftt"]["bob"] == 30.0
    assert data["uplink_bytes_per_round"] == {"pftt": 1000.0}
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    render(comparison)
    out = capsys.readouterr().out
    assert "alice" in out and "25.00" in out and "1,000" in out


@pytest.mark.flower
def test_eval_trains_and_evaluates_on_the_given_base_model(
    tmp_path: Path, micro_models: ModelPair
) -> None:
    """`--base-model DIR` is the model the simulation trains on: the home has no models at all."""
    home = tmp_path / "home"
    write_silos(home / "silos", {"alice": "pirate", "bob": "chef"}, n_train=4, n_eval=2)
    assert not (home / "models").exists()
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            "--home", str(home), "--out", str(tmp_path / "out"), "--methods", "base,fedavg",
            "--rounds", "1", "--local-steps", "1", "--batch-size", "2", "--max-len", "64",
            "--rank", "2", "--cpus", "1", "--base-model", str(micro_models.large.path),
        ]
    )  # fmt: skip

    assert run(args) == 0

    data = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert set(data["perplexity"]) == {"base", "fedavg"}
    assert set(data["perplexity"]["fedavg"]) == {"alice", "bob"}
    assert data["uplink_bytes_per_round"]["fedavg"] > 0
    served = AdapterStore(tmp_path / "out" / "fedavg" / "store").current(Slot.user_served("alice"))
    assert served is not None and served.base_model == micro_models.large.name
