"""`fedpersona eval`'s outputs: comparison JSON (means, traffic) and the PNG chart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fedpersona.trainer.commands.eval import Comparison, render, save


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
