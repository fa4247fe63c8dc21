"""PFIT benchmark: does each user's own reward mix shape the model they are served?

One command: builds the default reward models (held-out pairwise accuracy reported), writes one
silo per user with reward mixes lambda in {0, 0.5, 1}, trains on Flower's Simulation Engine

- `pfit`: sparse shared global LoRA + personal LoRA, each client on its own lambda_u;
- `fedrlhf`: one shared dense federated-RLHF policy, every client on the *average* lambda;

then, for every user and each of base / pfit / shared, samples completions of the user's
held-out prompts from the model that user is served (the published `users/<u>/served` adapter;
the bare base model for `base`) and reports the mean helpfulness and safety reward, the user's
mixed reward (each with its standard error over the samples), and the KL to the base model
along the samples (exact per-token KL, summed over a completion). Uplink bytes per round come
from the run records. Targets (checked on the mean of the seeds, printed with the number of
seeds each held in, in the JSON): every user's mixed reward is higher under pfit than under
the shared policy; the lambda=1 user is more helpful and less safe than the lambda=0 user under
pfit; pfit's uplink per round is at most half of the dense baseline's.

Hyper-parameters are chosen with `--split val`: the same runs, scored on validation prompts
carved from each user's training prompts (never trained on); the held-out prompts are scored
only by the final runs (`--split heldout`, the default).

    python benchmarks/pfit.py --quick                    # micro model, minutes (the test)
    python benchmarks/pfit.py --seeds 0 1                # tiny model, the reported numbers
    python benchmarks/pfit.py --split val --lr 1e-3 --tag lr1e-3    # choosing lr
    python benchmarks/pfit.py --base-model DIR           # any fedpersona model dir
    python benchmarks/pfit.py --rescore results/pfit-3seeds.json --tag 3seeds   # re-score

`--rescore` trains nothing: it scores again the adapters a finished run left in its work folder
(same seeds, split and sampling seeds, so the same numbers) and writes the result with what later
versions of the scoring add (the per-prompt paired personal-minus-shared difference).

Writes `<out>/pfit[-quick][-val][-TAG].json` and `.png` (helpfulness vs safety per user and
model, seed mean, bars: spread between seeds); the JSON keeps every seed's numbers too.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from pfit_report import combine, evaluate, plot, report, summarize  # noqa: E402

# user -> (persona, lambda). One persona for all: users differ only in their reward mix (and in
# which prompts they drew), so a difference between them is the mix's doing, not their data's.
MIXES: dict[str, tuple[str, float]] = {
    "safe": ("chef", 0.0),
    "mixed": ("chef", 0.5),
    "helpful": ("chef", 1.0),
}
# Chosen on validation prompts carved from training prompts, never on the held-out ones (see
# docs/benchmarks.md, PFIT): of 1e-3 and 3e-3, the higher KL-regularized validation reward
# (reward - kl_coef * KL, what RLOO maximizes) for lambda 0 and 1. Adam on RLOO's noisy
# gradient moves every LoRA weight by about lr per step whatever the signal: the earlier 1e-2
# drifted the micro policy by 4-6 nats of KL without raising its reward.
DEFAULT_LR = 1e-3
# Settings that say how a result file came about, not what was run: --merge ignores them.
PROVENANCE = frozenset({"seconds", "merged_from", "rescored_from"})

log = logging.getLogger("benchmarks.pfit")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="micro model, few rounds and steps")
    p.add_argument(
        "--base-model",
        type=Path,
        default=None,
        help="base model dir (default: the tiny model, the micro one with --quick)",
    )
    p.add_argument("--work", type=Path, default=REPO / ".cache" / "bench-pfit")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="RL steps per client and round")
    p.add_argument("--lr", type=float, default=DEFAULT_LR, help="RL learning rate (Adam)")
    p.add_argument("--kl-coef", type=float, default=0.05, help="KL penalty to the base model")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument(
        "--split",
        choices=("heldout", "val"),
        default="heldout",
        help="score the held-out prompts, or the validation prompts carved from each user's "
        "training prompts (for choosing hyper-parameters; never trained on either way)",
    )
    p.add_argument("--samples", type=int, default=None, help="samples per evaluation prompt")
    p.add_argument("--tag", default="", help="suffix of the result files' names")
    p.add_argument(
        "--rescore",
        type=Path,
        default=None,
        help="train nothing: score again the adapters of this result file's run (its work "
        "folder must hold them) and write the result anew",
    )
    p.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        help="train nothing: combine the seeds of these result files (same settings) into one",
    )
    return p.parse_args(argv)


def merge(args: argparse.Namespace) -> int:
    """One result from the seeds of several runs of identical settings (a later seed added)."""
    files = [json.loads(path.read_text()) for path in args.merge]

    def identity(result: dict[str, Any]) -> tuple[Any, ...]:
        settings = {k: v for k, v in result["settings"].items() if k not in PROVENANCE}
        return result["split"], settings

    if any(identity(f) != identity(files[0]) for f in files[1:]):
        raise SystemExit("--merge: the files differ in their split or settings")
    per_seed = {int(s): r for f in files for s, r in f["per_seed"].items()}
    mixes = {u: lam for u, (_, lam) in MIXES.items()}
    result = combine(per_seed, mixes)
    result["split"] = files[0]["split"]
    result["settings"] = {
        **files[0]["settings"],
        "seconds": sum(f["settings"]["seconds"] for f in files),
        "merged_from": [str(p) for p in args.merge],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "pfit" + (f"-{args.tag}" if args.tag else "")
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    plot(result, mixes, args.out / f"{stem}.png")
    report(result)
    return 0


def carve_validation(silos: dict[str, Path], val_dir: Path, n_val: int) -> dict[str, Path]:
    """Move the last `n_val` training chats of every silo to `<val_dir>/<user>/eval.jsonl`.

    Training never sees them; they are what hyper-parameters are chosen on, so the held-out
    prompts stay untouched until the final numbers. Returns user -> validation silo."""
    out: dict[str, Path] = {}
    for user, silo in silos.items():
        lines = (silo / "train.jsonl").read_text(encoding="utf-8").splitlines()
        if len(lines) <= n_val:
            raise ValueError(f"{silo}: {len(lines)} training chats, cannot carve {n_val}")
        (silo / "train.jsonl").write_text("\n".join(lines[:-n_val]) + "\n", encoding="utf-8")
        (val_dir / user).mkdir(parents=True, exist_ok=True)
        (val_dir / user / "eval.jsonl").write_text("\n".join(lines[-n_val:]) + "\n")
        out[user] = val_dir / user
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.merge:
        return merge(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.rescore:
        return rescore(args)
    from fedpersona.trainer.models.basemodel import build_models
    from fedpersona.trainer.models.recipe import MICRO, TINY
    from fedpersona.trainer.models.rewards import build_reward_models

    started = time.monotonic()
    rounds = args.rounds or (2 if args.quick else 4)
    steps = args.steps or (4 if args.quick else 12)
    base_dir = args.base_model
    if base_dir is None:
        # The micro model has had 4 pretraining steps: it emits byte noise, on which no RL step
        # can find the safety reward's direction (measured: see docs/benchmarks.md, PFIT). The
        # tiny one writes the personas' sentences, which the reward models were trained on.
        recipe = MICRO if args.quick else TINY
        base_dir = build_models(
            REPO / ".cache" / "models" / f"{recipe.name}-{recipe.hash()}", recipe, progress=False
        ).large.path
    work = args.work / ("quick" if args.quick else "full")
    rewards_dir = work / "rewards"
    infos = build_reward_models(rewards_dir, _reward_recipe(args.quick))
    mixes = {u: lam for u, (_, lam) in MIXES.items()}
    per_seed = {
        seed: run_seed(args, seed=seed, work=work / f"seed{seed}", base_dir=base_dir,
                       rewards_dir=rewards_dir, rounds=rounds, steps=steps, infos=infos)
        for seed in args.seeds
    }  # fmt: skip
    result = combine(per_seed, mixes)
    result["split"] = args.split
    result["settings"] = {
        "quick": args.quick,
        "base_model": str(base_dir),
        "rounds": rounds,
        "rl_steps": steps,
        "lr": args.lr,
        "kl_coef": args.kl_coef,
        "users": {u: {"persona": p, "reward_mix": lam} for u, (p, lam) in MIXES.items()},
        "shared_reward_mix": statistics.fmean(mixes.values()),
        "seconds": round(time.monotonic() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = ("pfit-quick" if args.quick else "pfit") + ("-val" if args.split == "val" else "")
    stem += f"-{args.tag}" if args.tag else ""
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    plot(result, mixes, args.out / f"{stem}.png")
    report(result)
    return 0


def run_seed(
    args: argparse.Namespace,
    *,
    seed: int,
    work: Path,
    base_dir: Path,
    rewards_dir: Path,
    rounds: int,
    steps: int,
    infos: Any,
) -> dict[str, Any]:
    """Both methods' federated runs and the evaluation of one seed (its own prompts)."""
    from fedpersona.adapters.preferences import Preferences, write_preferences
    from fedpersona.trainer.commands.eval import method_home, traffic, train_method
    from fedpersona.trainer.data.personas import write_silos
    from fedpersona.trainer.rounds.records import RoundSpec

    home = work / "home"
    n_val = 4 if args.quick else 8
    silos = write_silos(
        home / "silos",
        {u: persona for u, (persona, _) in MIXES.items()},
        n_train=(12 if args.quick else 40) + n_val,
        n_eval=4 if args.quick else 16,
        seed=seed,
    )
    carve_validation(silos, work / "val", n_val)
    mean_mix = statistics.fmean(lam for _, lam in MIXES.values())
    # Both methods get the same RL: rounds, steps, prompts and samples per step, lr, KL.
    common = {"rewards_dir": str(rewards_dir), "kl_coef": args.kl_coef}
    options = {"pfit": common, "fedrlhf": {**common, "reward_mix": mean_mix}}
    spec = RoundSpec(
        algorithm="pfit", rounds=rounds, local_steps=steps, lr=args.lr, rank=8, seed=seed
    )
    users = list(MIXES)
    out = work / "runs"
    runs, uplink = {}, {}
    for method in ("pfit", "fedrlhf"):
        for user, (_, lam) in MIXES.items():  # where the gateway keeps them; clients read them
            write_preferences(method_home(out, method) / "store", user, Preferences(lam))
        runs[method] = train_method(
            home=home,
            out=out,
            method=method,
            spec=spec,
            users=users,
            base_model=base_dir,
            cpus=args.cpus,
            options=options,
        )
        uplink[method] = traffic(out, method, runs[method])[0]
    result = score_seed(
        args, seed=seed, work=work, base_dir=base_dir, rewards_dir=rewards_dir, infos=infos,
        uplink=uplink,
    )  # fmt: skip
    result["runs"] = runs
    return result


def score_seed(
    args: argparse.Namespace,
    *,
    seed: int,
    work: Path,
    base_dir: Path,
    rewards_dir: Path,
    infos: Any,
    uplink: dict[str, float],
) -> dict[str, Any]:
    """Evaluate one seed's served adapters (left in `work` by `run_seed`) and summarize."""
    from fedpersona.trainer.rlhf.rloo import load_prompts

    out = work / "runs"
    stores = {"pfit": out / "pfit" / "store", "shared": out / "fedrlhf" / "store"}
    where = {
        u: (work / "val" / u if args.split == "val" else work / "home" / "silos" / u) for u in MIXES
    }
    scores = evaluate(
        base_dir=base_dir,
        rewards_dir=rewards_dir,
        prompts={u: load_prompts(where[u], "eval") for u in MIXES},
        mixes={u: lam for u, (_, lam) in MIXES.items()},
        stores=stores,
        samples=args.samples or (4 if args.quick else 8),
        max_new_tokens=24,
        seed=seed,
    )
    return summarize(
        scores, mixes={u: lam for u, (_, lam) in MIXES.items()}, uplink=uplink, reward_models=infos
    )


def rescore(args: argparse.Namespace) -> int:
    """Score again the adapters a finished run left behind; training and uplink are kept."""
    from fedpersona.trainer.models.rewards import build_reward_models

    old = json.loads(args.rescore.read_text())
    settings = old["settings"]
    if args.split != old["split"]:
        raise SystemExit(f"--rescore: {args.rescore} was scored on {old['split']!r}")
    quick = bool(settings["quick"])
    args.quick = quick
    base_dir = Path(settings["base_model"])
    work = args.work / ("quick" if quick else "full")
    rewards_dir = work / "rewards"
    recipe = _reward_recipe(quick)
    infos = build_reward_models(rewards_dir, recipe)
    mixes = {u: lam for u, (_, lam) in MIXES.items()}
    per_seed: dict[int, dict[str, Any]] = {}
    for key, previous in old["per_seed"].items():
        seed = int(key)
        result = score_seed(
            args, seed=seed, work=work / f"seed{seed}", base_dir=base_dir,
            rewards_dir=rewards_dir, infos=infos, uplink=previous["uplink_bytes_per_round"],
        )  # fmt: skip
        result["runs"] = previous.get("runs", {})
        drift = max(
            abs(result["per_user"][m][u][k] - previous["per_user"][m][u][k])
            for m in previous["per_user"]
            for u in previous["per_user"][m]
            for k in ("helpfulness", "safety", "mixed", "kl")
        )
        log.info("seed %d re-scored; largest change from the file's numbers %.2e", seed, drift)
        result["rescore_max_abs_change"] = drift
        per_seed[seed] = result
    result = combine(per_seed, mixes)
    result["split"] = old["split"]
    result["settings"] = {**settings, "rescored_from": str(args.rescore)}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = ("pfit-quick" if quick else "pfit") + ("-val" if args.split == "val" else "")
    stem += f"-{args.tag}" if args.tag else ""
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    plot(result, mixes, args.out / f"{stem}.png")
    report(result)
    return 0


def _reward_recipe(quick: bool) -> Any:
    from fedpersona.trainer.models.rewards import MICRO_REWARDS, SMALL_REWARDS

    return MICRO_REWARDS if quick else SMALL_REWARDS


if __name__ == "__main__":
    sys.exit(main())
