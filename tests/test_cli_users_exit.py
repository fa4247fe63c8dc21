"""`fedpersona users` follows docs/cli.md's exit statuses: a refused input (the user exists, a
bad name, a deleted name without `--reuse-deleted-name`, an unknown user) is 2, and nothing was
changed; success is 0."""

from __future__ import annotations

from pathlib import Path

import pytest
from fedpersona.service.commands.users import main


def users(home: Path, *argv: str) -> int:
    return main(["--home", str(home), *argv])


def test_input_errors_exit_2_and_change_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    assert users(home, "add", "alice") == 0
    capsys.readouterr()
    assert users(home, "add", "alice") == 2
    assert "exists" in capsys.readouterr().err
    assert users(home, "add", "Bad Name!") == 2
    assert "Bad Name!" in capsys.readouterr().err
    assert users(home, "issue", "nobody") == 2
    assert users(home, "alpha", "alice", "nan") == 2
    assert users(home, "delete", "alice") == 0
    capsys.readouterr()
    # A deleted name is refused as an input error too: the message says which flag reuses it.
    assert users(home, "add", "alice") == 2
    assert "--reuse-deleted-name" in capsys.readouterr().err
    assert users(home, "list", "--json") == 0
    assert capsys.readouterr().out.strip() == "[]"
