"""One CLI convention, checked over every subcommand (docs/cli.md).

Each command's `--help` exits 0 and shows the defaults; `-v` and a group's `--home` work after
the subcommand; a usage error exits 2; docs/cli.md names every command.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

import pytest

from fedpersona.cli import HelpFormatter, build_parser, main, subcommands

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = subcommands(build_parser())


def _leaf(path: tuple[str, ...]) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def test_the_command_table_is_complete() -> None:
    assert {("serve",), ("train",), ("users", "list"), ("data", "shakespeare")} <= set(COMMANDS)


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_every_help_exits_0_and_shows_defaults(
    path: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        main([*path, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "-v, --verbose" in text
    formatter = HelpFormatter("fedpersona")
    for action in _leaf(path)._actions:
        real = action.option_strings and action.default not in (None, False, argparse.SUPPRESS)
        if real and action.help is not argparse.SUPPRESS and action.dest != "help":
            assert "default" in (formatter._get_help_string(action) or ""), action.dest


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_usage_errors_exit_2(path: tuple[str, ...]) -> None:
    with pytest.raises(SystemExit) as done:
        main([*path, "--no-such-flag"])
    assert done.value.code == 2


def test_global_options_after_the_subcommand(tmp_path: Path) -> None:
    parser = build_parser()
    args = parser.parse_args(["users", "list", "--home", str(tmp_path), "-v"])
    assert args.home == tmp_path and args.verbose
    args = parser.parse_args(["users", "--home", str(tmp_path), "list"])
    assert args.home == tmp_path and not args.verbose
    args = parser.parse_args(["train", "-v", "--home", str(tmp_path)])
    assert args.home == tmp_path and args.verbose


def test_home_before_the_subcommand_reaches_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDPERSONA_HOME", str(tmp_path / "elsewhere"))  # restored afterwards
    assert main(["--home", str(tmp_path), "users", "list", "--json"]) == 0
    assert (tmp_path / "registry.sqlite").exists()


def test_shakespeare_users_is_a_deprecated_alias(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    args = build_parser().parse_args(["data", "shakespeare", "--corpus", "c", "--users", "3"])
    assert args.speakers == 3
    assert "--users is deprecated here: use --speakers 3" in caplog.text
    assert build_parser().parse_args(["data", "shakespeare", "--corpus", "c"]).speakers == 10


def test_docs_cli_names_every_command() -> None:
    text = (ROOT / "docs" / "cli.md").read_text()
    missing = [" ".join(p) for p in COMMANDS if f"fedpersona {' '.join(p)}" not in text]
    assert not missing, f"docs/cli.md does not describe: {missing}"
    assert re.search(r"\b2\b.*usage", text) and "--engine-port" in text
