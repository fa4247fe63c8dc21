"""How stable is a default reward model's held-out pairwise accuracy? Builds one recipe's model for
several seeds (and whatever CPU kernels torch uses here) and reports held-out accuracy per seed,
and with `--by-phrase` per pair of response kinds and unseen phrases, which shows what decides it.

Why it exists: the `small` safety model was recorded at 0.888 on an earlier machine and builds to
0.694 here with the same code and seed. Running this under `ATEN_CPU_CAPABILITY=avx2` (or
`default`) beside the machine's own kernels tells a code change from a rounding-sensitive build;
`--seeds` gives the spread a recipe has anyway. Builds into a temporary folder; the benchmark's
cached models are not touched.

    python benchmarks/pfit_rewards_probe.py --seeds 0 1 2 3 4 5 --by-phrase
    ATEN_CPU_CAPABILITY=avx2 python benchmarks/pfit_rewards_probe.py --seeds 0 --tag avx2
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def phrase_of(text: str) -> str:
    """Which rule-made phrase ends a response (`caveat5`, `reckless6`, ...), else `direct`."""
    from fedpersona.trainer.rlhf import pairs

    for name, options in (
        ("caveat", pairs.CAVEATS),
        ("evasion", pairs.EVASIONS),
        ("reckless", pairs.RECKLESS),
    ):
        for i, option in enumerate(options):
            if text.endswith(option):
                return f"{name}{i}"
    return "direct"


def probe(recipe: Any, objective: str, seed: int, by_phrase: bool) -> dict[str, Any]:
    from fedpersona.trainer.models import rewards
    from fedpersona.trainer.rlhf.pairs import OBJECTIVES, preference_data
    from fedpersona.trainer.rlhf.scorer import RewardModel

    recipe = dataclasses.replace(recipe, seed=seed)
    data = {
        o: preference_data(o, per_persona=recipe.per_persona, seed=recipe.seed) for o in OBJECTIVES
    }
    tokenizer = rewards._tokenizer(data, recipe)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / objective
        marker = rewards._train(path, data[objective], tokenizer, recipe)
        row: dict[str, Any] = {
            "seed": seed,
            "heldout_accuracy": marker["heldout_accuracy"],
            "train_accuracy": marker["train_accuracy"],
            "heldout_pairs": marker["heldout_pairs"],
        }
        if by_phrase:
            model = RewardModel(path, max_len=recipe.max_len)
            held = data[objective].heldout
            chosen = model.raw_scores([p.prompt for p in held], [p.chosen for p in held])
            rejected = model.raw_scores([p.prompt for p in held], [p.rejected for p in held])
            right: dict[str, list[bool]] = collections.defaultdict(list)
            for pair, c, r in zip(held, chosen, rejected, strict=True):
                right[f"{phrase_of(pair.chosen)} > {phrase_of(pair.rejected)}"].append(bool(c > r))
            row["by_phrase"] = {
                k: {"pairs": len(v), "accuracy": round(statistics.fmean(v), 3)}
                for k, v in sorted(right.items())
            }
    return row


def main(argv: list[str] | None = None) -> int:
    import torch
    from fedpersona.trainer.models.rewards import REWARD_RECIPES, build_environment

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", choices=sorted(REWARD_RECIPES), default="small")
    p.add_argument("--objective", choices=("helpfulness", "safety"), default="safety")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--by-phrase", action="store_true")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--tag", default="", help="suffix of the result file's name")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for seed in args.seeds:
        row = probe(REWARD_RECIPES[args.recipe], args.objective, seed, args.by_phrase)
        rows.append(row)
        sys.stdout.write(f"seed {seed}: held-out accuracy {row['heldout_accuracy']:.4f}\n")
        for k, v in row.get("by_phrase", {}).items():
            sys.stdout.write(f"    {k:24} {v['pairs']:4d} pairs  {v['accuracy']:.3f}\n")
    result = {
        "recipe": args.recipe,
        "objective": args.objective,
        "environment": build_environment(),
        "seeds": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"pfit-rewards-probe-{args.recipe}-{args.objective}" + (
        f"-{args.tag}" if args.tag else ""
    )
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
