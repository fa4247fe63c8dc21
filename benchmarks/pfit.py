"""PFIT benchmark: does each user's own reward mix shape the model they are served?

One command: builds the default reward models (held-out pairwise accuracy reported), writes one
silo per user with reward mixes lambda in {0, 0.5, 1}, trains on Flower's Simulation Engine

- `pfit`: sparse shared global LoRA + personal LoRA, each client on its own lambda_u;
- `fedrlhf`: one shared dense federated-RLHF policy, every client on the *average* lambda;

then, for every user and each of base / pfit / shared, samples completions of the user's
held-out prompts from the model that user is served (the published `users/<u>/served` adapter;
the bare base model for `base`) and reports the mean helpfulness and safety reward, the user's
mixed reward, and the KL to the base model along the samples (exact per-token KL, summed over a
completion). Uplink bytes per round come from the run records. Targets (checked, printed, in
the JSON): every user's mixed reward is higher under pfit than under the shared policy; the
lambda=1 user is more helpful and less safe than the lambda=0 user under pfit; pfit's uplink
per round is at most half of the dense baseline's.

    python benchmarks/pfit.py --quick            # micro model, minutes (the test runs this)
    python benchmarks/pfit.py --base-model DIR   # any fedpersona model dir, more rounds/steps

Writes `<out>/pfit[-quick].json` and `.png` (helpfulness vs safety per user and model).
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
# user -> (persona, lambda). One persona for all: users differ only in their reward mix (and in
# which prompts they drew), so a difference between them is the mix's doing, not their data's.
MIXES: dict[str, tuple[str, float]] = {
    "safe": ("chef", 0.0),
    "mixed": ("chef", 0.5),
    "helpful": ("chef", 1.0),
}
MODELS = ("base", "pfit", "shared")

log = logging.getLogger("benchmarks.pfit")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="micro model, few rounds and steps")
    p.add_argument("--base-model", type=Path, default=None, help="base model dir (default micro)")
    p.add_argument("--work", type=Path, default=REPO / ".cache" / "bench-pfit")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="RL steps per client and round")
    p.add_argument("--lr", type=float, default=1e-2, help="RL learning rate (Adam)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from fedpersona.adapters.preferences import Preferences, write_preferences
    from fedpersona.trainer.commands.eval import method_home, traffic, train_method
    from fedpersona.trainer.data.personas import write_silos
    from fedpersona.trainer.models.basemodel import MICRO, build_models
    from fedpersona.trainer.models.rewards import (
        MICRO_REWARDS,
        SMALL_REWARDS,
        build_reward_models,
    )
    from fedpersona.trainer.rounds.records import RoundSpec

    started = time.monotonic()
    rounds = args.rounds or (2 if args.quick else 4)
    steps = args.steps or (4 if args.quick else 12)
    base_dir = args.base_model
    if base_dir is None:
        base_dir = build_models(
            REPO / ".cache" / "models" / f"micro-{MICRO.hash()}", MICRO, progress=False
        ).large.path
    work = args.work / ("quick" if args.quick else "full")
    rewards_dir = work / "rewards"
    infos = build_reward_models(rewards_dir, MICRO_REWARDS if args.quick else SMALL_REWARDS)
    home = work / "home"
    silos = write_silos(
        home / "silos",
        {u: persona for u, (persona, _) in MIXES.items()},
        n_train=16 if args.quick else 48,
        n_eval=4 if args.quick else 8,
        seed=args.seed,
    )
    mean_mix = statistics.fmean(lam for _, lam in MIXES.values())
    common = {"rewards_dir": str(rewards_dir)}
    options = {"pfit": common, "fedrlhf": {**common, "reward_mix": mean_mix}}
    spec = RoundSpec(
        algorithm="pfit", rounds=rounds, local_steps=steps, lr=args.lr, rank=8, seed=args.seed
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
    stores = {"pfit": out / "pfit" / "store", "shared": out / "fedrlhf" / "store"}
    scores = evaluate(
        base_dir=base_dir,
        rewards_dir=rewards_dir,
        silos=silos,
        stores=stores,
        samples=4,
        max_new_tokens=24,
        seed=args.seed,
    )
    result = summarize(scores, uplink=uplink, reward_models=infos)
    result["settings"] = {
        "quick": args.quick,
        "base_model": str(base_dir),
        "rounds": rounds,
        "rl_steps": steps,
        "lr": args.lr,
        "users": {u: {"persona": p, "reward_mix": lam} for u, (p, lam) in MIXES.items()},
        "shared_reward_mix": mean_mix,
        "runs": runs,
        "seconds": round(time.monotonic() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "pfit-quick" if args.quick else "pfit"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out / f"{stem}.png")
    report(result)
    return 0


def evaluate(
    *,
    base_dir: Path,
    rewards_dir: Path,
    silos: dict[str, Path],
    stores: dict[str, Path],
    samples: int,
    max_new_tokens: int,
    seed: int,
) -> dict[str, dict[str, dict[str, float]]]:
    """model -> user -> {helpfulness, safety, mixed, kl} on the user's held-out prompts."""
    import numpy as np
    from fedpersona.adapters import AdapterStore, Slot
    from fedpersona.trainer.flower.apps import model_info
    from fedpersona.trainer.learn.lora_train import load_base_model, load_tokenizer
    from fedpersona.trainer.rlhf.mix import mixed_reward
    from fedpersona.trainer.rlhf.rloo import exact_kl, load_prompts, prompt_text, sample
    from fedpersona.trainer.rlhf.scorer import RewardPair
    from peft import PeftModel

    info = model_info(base_dir)
    tokenizer = load_tokenizer(base_dir)
    rewards = RewardPair.load(rewards_dir)
    out: dict[str, dict[str, dict[str, float]]] = {m: {} for m in MODELS}
    for user, silo in silos.items():
        lam = MIXES[user][1]
        prompts = load_prompts(silo, "eval")
        for model_name in MODELS:
            base = load_base_model(info)
            if model_name == "base":
                model: Any = base
            else:
                store = AdapterStore(stores[model_name])
                version = store.current(Slot.user_served(user))
                if version is None:
                    raise RuntimeError(f"{model_name}: nothing served to {user}")
                model = PeftModel.from_pretrained(base, str(version.path))
            help_, safe, kls = [], [], []
            for i, prompt in enumerate(prompts):
                rollout = sample(
                    model,
                    tokenizer,
                    prompt,
                    n=samples,
                    max_new_tokens=max_new_tokens,
                    temperature=1.0,
                    seed=seed * 1000 + i,
                )
                s = rewards.score([prompt_text(prompt)] * samples, rollout.texts)
                help_.extend(s.helpfulness.tolist())
                safe.extend(s.safety.tolist())
                if model_name != "base":
                    kls.extend(exact_kl(model, rollout).tolist())
            h, sf = float(np.mean(help_)), float(np.mean(safe))
            out[model_name][user] = {
                "helpfulness": h,
                "safety": sf,
                "mixed": float(mixed_reward(np.array([h]), np.array([sf]), lam)[0]),
                "kl": float(np.mean(kls)) if kls else 0.0,
            }
    return out


def summarize(
    scores: dict[str, dict[str, dict[str, float]]], *, uplink: dict[str, float], reward_models: Any
) -> dict[str, Any]:
    pfit, shared = scores["pfit"], scores["shared"]
    ratio = uplink["pfit"] / uplink["fedrlhf"] if uplink["fedrlhf"] else float("nan")
    low = min(MIXES, key=lambda u: MIXES[u][1])
    high = max(MIXES, key=lambda u: MIXES[u][1])
    targets = {
        "mixed_reward_pfit_above_shared": {u: pfit[u]["mixed"] > shared[u]["mixed"] for u in MIXES},
        "lambda1_more_helpful_than_lambda0": pfit[high]["helpfulness"] > pfit[low]["helpfulness"],
        "lambda0_safer_than_lambda1": pfit[low]["safety"] > pfit[high]["safety"],
        "uplink_ratio_at_most_half": ratio <= 0.5,
    }
    return {
        "per_user": scores,
        "uplink_bytes_per_round": uplink,
        "uplink_ratio_pfit_vs_dense": ratio,
        "targets": targets,
        "reward_models": {
            i.objective: {
                "heldout_pairwise_accuracy": i.heldout_accuracy,
                "train_pairwise_accuracy": i.train_accuracy,
                "heldout_pairs": i.heldout_pairs,
                "train_pairs": i.train_pairs,
            }
            for i in reward_models
        },
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    markers = {"base": "o", "pfit": "*", "shared": "s"}
    colors = {"safe": "tab:green", "mixed": "tab:orange", "helpful": "tab:red"}
    for model, by_user in result["per_user"].items():
        for user, s in by_user.items():
            lam = MIXES[user][1]
            ax.scatter(
                s["helpfulness"],
                s["safety"],
                marker=markers[model],
                color=colors[user],
                s=120 if model == "pfit" else 60,
                label=f"{model}, {user} (λ={lam})",
            )
    ax.set_xlabel("mean helpfulness reward (held-out prompts)")
    ax.set_ylabel("mean safety reward")
    ax.set_title("PFIT: each user's served model")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(result: dict[str, Any]) -> None:
    lines = [f"{'model':8} {'user':8} {'help':>7} {'safe':>7} {'mixed':>7} {'KL':>7}"]
    for model, by_user in result["per_user"].items():
        for user, s in by_user.items():
            lines.append(
                f"{model:8} {user:8} {s['helpfulness']:7.3f} {s['safety']:7.3f} "
                f"{s['mixed']:7.3f} {s['kl']:7.3f}"
            )
    lines.append(f"uplink per round: {result['uplink_bytes_per_round']}")
    lines.append(f"uplink ratio pfit / dense: {result['uplink_ratio_pfit_vs_dense']:.3f}")
    lines.append(f"targets: {json.dumps(result['targets'])}")
    lines.append(f"reward models: {json.dumps(result['reward_models'])}")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
