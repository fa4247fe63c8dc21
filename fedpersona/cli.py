"""The `fedpersona` command line: one root parser; the packages register their own subcommands.

The root belongs to neither side. Each package lists its subcommands in a `COMMANDS` table of its
`commands` package (`name -> (module, help)`; a space makes a nested command, "models import"),
and each command module exposes `add_arguments(parser)` and `run(args) -> int`. Commands that
take from both packages are the root's own (`ROOT_COMMANDS`: the trainer pod's API).
This module only wires the tables into argparse; it knows nothing about what a command does.

Conventions it enforces on every command (docs/cli.md, checked by tests/test_cli_help.py):
`--help` shows each option's default; `-v/--verbose` and, where a command group takes it,
`--home` are accepted before or after the subcommand; exit status 0 is success, 2 a usage or
input error (nothing was done), 1 a runtime failure, 130 an interrupt.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from fedpersona.adapters.home import HOME_ENV
from fedpersona.service.commands import COMMANDS as SERVICE_COMMANDS
from fedpersona.trainer.commands import COMMANDS as TRAINER_COMMANDS

# Composed in the root from both packages.
ROOT_COMMANDS: dict[str, tuple[str, str]] = {
    "trainer": (
        "fedpersona.trainer_api",
        "the trainer pod's HTTP API: /admin/rounds (+ Flower SuperLink)",
    ),
}

# Order of `fedpersona --help`.
COMMAND_TABLES: tuple[dict[str, tuple[str, str]], ...] = (
    SERVICE_COMMANDS,
    TRAINER_COMMANDS,
    ROOT_COMMANDS,
)


EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in `--help`, except the ones that say nothing (None, False: "not set") and
    those a command's help already states ("default ...")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _add_command(sub: argparse._SubParsersAction, name: str, module: str, help_: str) -> None:
    parser = sub.add_parser(name, help=help_, description=help_, formatter_class=HelpFormatter)
    mod = importlib.import_module(module)
    mod.add_arguments(parser)
    parser.set_defaults(_run=mod.run)


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings}


def _children(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    return [
        child
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for child in dict.fromkeys(action.choices.values())
    ]


def _harmonize(parser: argparse.ArgumentParser, *, home_above: bool) -> None:
    """Every parser below the root: defaults in help, `-v` here too, and a group's `--home`
    also after its subcommand (`users list --home X`). Added options default to SUPPRESS so
    that, when not given, they do not hide the value given further up."""
    parser.formatter_class = HelpFormatter
    own = _options(parser)
    if "--verbose" not in own:
        parser.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging"
        )
    if home_above and "--home" not in own:
        parser.add_argument(
            "--home", type=Path, default=argparse.SUPPRESS, help="fedpersona home (FEDPERSONA_HOME)"
        )
    for child in _children(parser):
        _harmonize(child, home_above=home_above or "--home" in own)


def subcommands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> list[tuple[str, ...]]:
    """Every runnable command path under `parser` (("users", "list"), ("train",), ...)."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found += subcommands(child, (*path, name)) if _children(child) else [(*path, name)]
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedpersona", description=__doc__.splitlines()[0], formatter_class=HelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--home",
        type=Path,
        dest="root_home",
        help="fedpersona home for any subcommand (env FEDPERSONA_HOME); also after it",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for table in COMMAND_TABLES:
        for name, (module, help_) in table.items():
            head, _, tail = name.partition(" ")
            if not tail:
                _add_command(sub, head, module, help_)
                continue
            if head not in groups:
                group = sub.add_parser(head, help=f"{head} commands")
                groups[head] = group.add_subparsers(dest=f"{head}_command", required=True)
            _add_command(groups[head], tail, module, help_)
    for child in _children(parser):
        _harmonize(child, home_above=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.root_home is not None:
        if getattr(args, "home", None) is None:
            args.home = args.root_home
        # Commands without a --home of their own read the home from the environment.
        os.environ[HOME_ENV] = str(args.root_home)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args._run(args) or EXIT_OK)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
