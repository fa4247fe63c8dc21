"""`fedpersona models rewards`: build (or reuse) the default reward models under
`<home>/models/rewards/{helpfulness,safety}` and report their held-out pairwise accuracy.

`--recipe micro` is the fast one the tests use; `small` (default) still builds in well under a
minute. A deployment with its own reward models puts any Hugging Face sequence-classification
directory (one output) in those places instead, or points a method at another directory. Importing
this module is cheap: torch loads only when the command runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedpersona.adapters.home import resolve_home

RECIPE_NAMES: tuple[str, ...] = ("small", "micro")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--home", type=Path, default=None, help="fedpersona home (default: $FEDPERSONA_HOME)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="where to build (default: <home>/models/rewards)"
    )
    parser.add_argument("--recipe", choices=RECIPE_NAMES, default="small")
    parser.add_argument("--force", action="store_true", help="rebuild even on a cache hit")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    from fedpersona.trainer.models.rewards import REWARD_RECIPES, build_reward_models
    from rich.console import Console
    from rich.table import Table

    out = args.out or resolve_home(args.home) / "models" / "rewards"
    with Console(stderr=True).status("building reward models"):
        infos = build_reward_models(out, REWARD_RECIPES[args.recipe], force=args.force)
    rows = [
        {
            "objective": i.objective,
            "path": str(i.path),
            "heldout_accuracy": i.heldout_accuracy,
            "train_accuracy": i.train_accuracy,
            "heldout_pairs": i.heldout_pairs,
            "train_pairs": i.train_pairs,
            "cache_hit": i.cache_hit,
        }
        for i in infos
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title=f"reward models (recipe {args.recipe})")
    for column in ("objective", "held-out accuracy", "train accuracy", "pairs", "path"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            str(r["objective"]),
            f"{r['heldout_accuracy']:.3f}",
            f"{r['train_accuracy']:.3f}",
            f"{r['train_pairs']} + {r['heldout_pairs']} held out",
            str(r["path"]) + (" (cached)" if r["cache_hit"] else ""),
        )
    Console().print(table)
    return 0
