"""`fedpersona train` keeps library noise behind `-v` and shows progress only on a terminal.

The end-to-end count of stderr lines of a real one-round run is in the README walk
(`tests/test_readme_using_it.py`, flower mark); these are the switches it relies on.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from fedpersona.trainer.commands.train import quiet_libraries, round_progress
from fedpersona.trainer.rounds.records import RunRecords

ENV = ("FLWR_LOG_LEVEL", "TRANSFORMERS_VERBOSITY", "PYTHONWARNINGS", "RAY_DEDUP_LOGS")


@pytest.fixture
def clean(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    for name in ("alembic", "flwr"):
        logger = logging.getLogger(name)
        monkeypatch.setattr(logger, "level", logger.level)
        monkeypatch.setattr(logger, "propagate", logger.propagate)


@pytest.mark.usefixtures("clean")
def test_quiet_without_verbose() -> None:
    quiet_libraries(False)
    assert os.environ["FLWR_LOG_LEVEL"] == "ERROR"
    assert os.environ["TRANSFORMERS_VERBOSITY"] == "error"
    assert "ignore::DeprecationWarning" in os.environ["PYTHONWARNINGS"]
    assert logging.getLogger("alembic").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("flwr").propagate is False  # Flower's lines once, not twice


@pytest.mark.usefixtures("clean")
def test_verbose_keeps_library_output() -> None:
    quiet_libraries(True)
    assert not any(name in os.environ for name in ENV)
    assert logging.getLogger("flwr").propagate is False


def test_no_progress_bar_off_a_terminal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with round_progress(RunRecords(tmp_path), "r-x", rounds=3):
        pass
    out, err = capsys.readouterr()
    assert out == "" and err == ""
