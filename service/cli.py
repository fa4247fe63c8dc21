"""The `fedpersona` command line: one root parser, subcommands owned by their packages.

This module only wires subcommands; each one lives next to the code it drives. Trainer commands
are registered through `trainer.cli.register`, the trainer's public CLI surface.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# subcommand -> (module, help). Each module exposes `add_arguments(parser)` and `run(args) -> int`.
_SERVICE_COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("service.serve_cmd", "run the OpenAI-compatible gateway (and, by default, vLLM)"),
    "engine": ("service.engine_cmd", "print or run the exact vLLM command the gateway would run"),
    "users": ("service.users_cmd", "manage users and their API keys"),
}


def _add_lazy(sub: argparse._SubParsersAction, name: str, module: str, help_: str) -> None:
    parser = sub.add_parser(name, help=help_, description=help_)
    mod = importlib.import_module(module)
    mod.add_arguments(parser)
    parser.set_defaults(_run=mod.run)


def build_parser() -> argparse.ArgumentParser:
    from trainer import cli as trainer_cli

    parser = argparse.ArgumentParser(prog="fedpersona", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_) in _SERVICE_COMMANDS.items():
        _add_lazy(sub, name, module, help_)
    trainer_cli.register(sub, _add_lazy)
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
