"""`fedpersona train` while another run (e.g. one started over HTTP) holds the runs lock: one
error line that says a run is in progress and what to do, exit 2, nothing recorded."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest
from fedpersona.trainer.commands import train
from fedpersona.trainer.rounds.lock import RunLock


def test_train_during_another_run_reports_the_lock_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    home = tmp_path / "home"
    monkeypatch.setattr(train, "resolve_users", lambda home, users: ["alice"])
    monkeypatch.setattr(train, "preflight", lambda *a, **k: None)
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    args = parser.parse_args(["--home", str(home)])
    with RunLock(home / "runs"), caplog.at_level(logging.INFO):
        assert train.run(args) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert "already in progress" in errors[0] and "GET /admin/rounds" in errors[0]
    assert not list((home / "runs").glob("r-*"))  # no run record was created
