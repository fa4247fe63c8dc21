"""The `fedpersona` command line: one root parser; the packages register their own subcommands.

The root belongs to neither side. Each package lists its subcommands in a `COMMANDS` table of its
`commands` package (`name -> (module, help)`; a space makes a nested command, "models import"),
and each command module exposes `add_arguments(parser)` and `run(args) -> int`. Commands that
take from both packages are the root's own (`ROOT_COMMANDS`: the trainer pod's API).
This module only wires the tables into argparse; it knows nothing about what a command does.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

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


def _add_command(sub: argparse._SubParsersAction, name: str, module: str, help_: str) -> None:
    parser = sub.add_parser(name, help=help_, description=help_)
    mod = importlib.import_module(module)
    mod.add_arguments(parser)
    parser.set_defaults(_run=mod.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpersona", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
