"""Trainer subcommands of `fedpersona`: registered into the root parser by `service.cli`.

Each subcommand's module exposes `add_arguments(parser)` and `run(args) -> int`; this module only
names them, so the root CLI never imports trainer internals by itself.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

# subcommand -> (module, help); nested commands use a space ("models bootstrap").
COMMANDS: dict[str, tuple[str, str]] = {
    "models bootstrap": ("trainer.bootstrap", "build and briefly pretrain the tiny base models"),
    "data shakespeare": ("trainer.shakespeare", "turn tinyshakespeare into per-speaker chat silos"),
    "train": ("trainer.train_cmd", "run federated rounds and publish adapters"),
    "eval": ("trainer.eval_cmd", "per-user held-out perplexity for each method"),
    "trainer": ("trainer.serve_cmd", "round controller HTTP API (+ Flower SuperLink)"),
}

AddLazy = Callable[[argparse._SubParsersAction, str, str, str], None]


def register(sub: argparse._SubParsersAction, add_lazy: AddLazy) -> None:
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, (module, help_) in COMMANDS.items():
        head, _, tail = name.partition(" ")
        if not tail:
            add_lazy(sub, head, module, help_)
            continue
        if head not in groups:
            group = sub.add_parser(head, help=f"{head} commands")
            groups[head] = group.add_subparsers(dest=f"{head}_command", required=True)
        add_lazy(groups[head], tail, module, help_)
