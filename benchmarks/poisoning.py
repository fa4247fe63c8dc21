"""Poisoning benchmark: 1 of 8 clients attacks the shared LoRA; how far does each rule move?

    python benchmarks/poisoning.py --quick

Eight users (one persona each) train one real FedAvg round of the shared LoRA on the micro model
(`--quick`) or the tiny one. Client 0's upload is then replaced by an attack on its own update
`u0 = upload0 - global`: `scaled` (global + 100 u0), `sign-flipped` (global - u0), `random`
(Gaussian noise with norm 100 |u0|), or left honest (`none`). Every aggregation rule of
`fedpersona.trainer.methods.robust` (plain mean, median, trimmed mean, krum, multi-krum, and
the mean with update-norm clipping at the honest clients' median norm) aggregates the eight
uploads. Reported per rule and attack:
- movement: |aggregate - honest mean| / |honest mean - global|, where the honest mean is the plain
  mean of the eight honest uploads (target: < 10% with a robust rule);
- attack effect: |aggregate - the same rule's aggregate of the eight honest uploads| / |honest
  mean - global|: how far the attacker moves that rule's own result (a robust rule that already
  differs from the mean without any attack is not charged for that difference);
- perplexity: the users' mean held-out perplexity with the aggregate served, and its change
  from the honest mean's (target: < 2%).
Writes `benchmarks/results/poisoning.json` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
ATTACKS = ("none", "scaled", "sign-flipped", "random")


def attack(kind: str, upload: dict, previous: dict, rng: np.random.Generator) -> dict:
    from fedpersona.trainer.methods.robust import update_norm

    delta = {k: upload[k].astype(np.float64) - previous[k] for k in upload}
    if kind == "none":
        bad = delta
    elif kind == "scaled":
        bad = {k: 100.0 * v for k, v in delta.items()}
    elif kind == "sign-flipped":
        bad = {k: -v for k, v in delta.items()}
    elif kind == "random":
        noise = {k: rng.normal(size=v.shape) for k, v in delta.items()}
        scale = 100.0 * update_norm(delta) / update_norm(noise)
        bad = {k: scale * v for k, v in noise.items()}
    else:
        raise ValueError(kind)
    return {k: (previous[k] + bad[k]).astype(np.float32) for k in previous}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="micro model, few steps")
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "bench-poisoning")
    parser.add_argument("--out", type=Path, default=RESULTS / "poisoning.json")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from fedpersona.trainer.data.personas import PERSONAS, write_silos
    from fedpersona.trainer.learn.evaluate import perplexity
    from fedpersona.trainer.methods import LoraSpec, TrainConfig, get_method
    from fedpersona.trainer.methods.robust import AggregationRule, update_norm
    from fedpersona.trainer.models.basemodel import MICRO, TINY, build_models
    from rich.console import Console
    from rich.table import Table

    recipe = MICRO if args.quick else TINY
    steps, n_train, n_eval = (6, 8, 4) if args.quick else (16, 32, 8)
    started = time.monotonic()
    models = build_models(REPO / ".cache" / "models" / f"{recipe.name}-{recipe.hash()}", recipe)
    base = models.large
    users = {f"u{i}": PERSONAS[i % len(PERSONAS)] for i in range(8)}
    silos = args.work / "silos"
    write_silos(silos, users, n_train=n_train, n_eval=n_eval)
    method = get_method("fedavg", spec=LoraSpec(rank=4, alpha=8.0))
    previous = method.init_global(base_model=base, seed=args.seed)
    config = TrainConfig(steps=steps, lr=5e-3, batch_size=4, max_len=64, seed=args.seed)
    uploads = []
    for user in users:
        update = method.client_update(
            base_model=base, silo=silos / user, global_params=previous, state={},
            config=config, round_idx=1,
        )  # fmt: skip
        uploads.append((update.upload, update.num_examples))
    honest = method.aggregate(previous=previous, results=uploads)
    honest_norm = update_norm({k: honest[k] - previous[k] for k in previous})
    norms = [update_norm({k: u[k] - previous[k] for k in previous}) for u, _ in uploads]
    clip = float(statistics.median(norms))
    rules = {
        "mean": AggregationRule(),
        "mean+clip": AggregationRule(clip_norm=clip),
        "median": AggregationRule(name="median"),
        "trimmed-mean": AggregationRule(name="trimmed-mean", trim_fraction=0.125),
        "krum": AggregationRule(name="krum", byzantine=1),
        "multi-krum": AggregationRule(name="multi-krum", byzantine=1),
    }

    def mean_ppl(params: dict) -> float:
        adapter = method.served_adapter(base_model=base, global_params=params, state={})
        return statistics.fmean(
            perplexity(base, adapter, silos / u, "eval", max_len=64) for u in users
        )

    honest_ppl = mean_ppl(honest)
    rng = np.random.default_rng(args.seed)
    rows = []
    rule_honest = {
        name: rule.aggregate(method, previous=previous, results=uploads, rng=rng)
        for name, rule in rules.items()
    }
    for kind in ATTACKS:
        poisoned = [(attack(kind, uploads[0][0], previous, rng), uploads[0][1]), *uploads[1:]]
        for name, rule in rules.items():
            got = rule.aggregate(method, previous=previous, results=poisoned, rng=rng)
            moved = update_norm({k: got[k] - honest[k] for k in honest}) / honest_norm
            own = rule_honest[name]
            effect = update_norm({k: got[k] - own[k] for k in own}) / honest_norm
            ppl = mean_ppl(got)
            rows.append(
                {
                    "attack": kind,
                    "rule": name,
                    "movement": round(moved, 4),
                    "attack_effect": round(effect, 4),
                    "perplexity": round(ppl, 4),
                    "perplexity_change": round(ppl / honest_ppl - 1, 4),
                }
            )
    result = {
        "model": recipe.name,
        "clients": len(users),
        "local_steps": steps,
        "honest_update_norm": honest_norm,
        "clip_norm": clip,
        "base_perplexity": mean_ppl(previous),
        "honest_perplexity": honest_ppl,
        "seconds": round(time.monotonic() - started, 1),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = Table(title=f"1 of 8 clients poisoned ({recipe.name}; honest ppl {honest_ppl:.3f})")
    for col in ("attack", "rule", "movement", "attack effect", "ppl", "ppl change"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["attack"], r["rule"], f"{r['movement']:.1%}", f"{r['attack_effect']:.1%}",
            f"{r['perplexity']:.3f}",
            f"{r['perplexity_change']:+.2%}",
        )  # fmt: skip
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
