"""`fedpersona models bootstrap`: build (or reuse) the base models under `<home>/models/`.

Thin command around `fedpersona.trainer.models.basemodel.build_models`: it resolves the home
directory and the
optional corpus file, shows pretraining progress and reports what happened (cache hit or built,
time, parameter counts, paths) as a table, or as JSON with `--json`. Importing it is cheap:
torch and transformers load only when the command runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from fedpersona.adapters.home import resolve_home

if TYPE_CHECKING:
    from fedpersona.trainer.models.basemodel import ModelPair

# The names of `fedpersona.trainer.models.basemodel.RECIPES`, spelled out so that building the root
# parser does not
# import torch and transformers (seconds) for every `fedpersona` command.
RECIPE_NAMES: tuple[str, ...] = ("micro", "tiny")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--home",
        type=Path,
        default=None,
        help="fedpersona home (default: $FEDPERSONA_HOME or ./.fedpersona)",
    )
    parser.add_argument(
        "--corpus",
        type=Path,
        default=None,
        help="UTF-8 text file to train the tokenizer and pretrain on "
        "(default: the built-in multi-persona chat corpus)",
    )
    parser.add_argument(
        "--recipe",
        choices=RECIPE_NAMES,
        default="tiny",
        help="model sizes and pretraining budget (default: tiny; micro is for tests)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even on a cache hit")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def summary(pair: ModelPair) -> dict[str, object]:
    """What the command reports, as plain data."""
    return {
        "cache_hit": pair.cache_hit,
        "seconds": round(pair.seconds, 2),
        "recipe_hash": pair.large.recipe_hash,
        "models": {
            info.role: {
                "name": info.name,
                "path": str(info.path),
                "num_parameters": info.num_parameters,
            }
            for info in (pair.large, pair.small)
        },
    }


def run(args: argparse.Namespace) -> int:
    from fedpersona.trainer.errors import DataError
    from fedpersona.trainer.models.basemodel import RECIPES, build_models
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    corpus_text = None
    if args.corpus is not None:
        try:
            corpus_text = args.corpus.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            console.print(f"[red]cannot read corpus {args.corpus}: {e}")
            return 2
    out_dir = resolve_home(args.home) / "models"
    try:
        pair = build_models(
            out_dir,
            RECIPES[args.recipe],
            corpus_text,
            progress=not args.json,
            force=args.force,
        )
    except DataError as e:
        console.print(f"[red]cannot build the base models: {e}")
        return 2
    result = summary(pair)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    what = "cache hit" if pair.cache_hit else "built"
    table = Table(title=f"base models: {what} in {pair.seconds:.1f} s (recipe {args.recipe})")
    for column in ("role", "name", "parameters", "path"):
        table.add_column(column)
    for info in (pair.large, pair.small):
        table.add_row(info.role, info.name, f"{info.num_parameters:,}", str(info.path))
    Console().print(table)
    return 0
