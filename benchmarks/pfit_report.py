"""Scoring, summary, plot and report of `benchmarks/pfit.py` (kept apart so each file stays short).

`evaluate` samples completions of every user's evaluation prompts (held-out, or the validation
prompts carved from their training prompts) from the model that user is served and scores them
with both reward models; `summarize` turns one seed's scores into targets; `combine` averages
seeds (each seed draws other prompts and other RL samples) and checks the targets on the mean,
with the number of seeds each one held in.

`paired` is the personal-minus-shared difference of a user's mixed reward with its standard
error over the evaluation prompts: both models answer the same prompts with the same sampling
seeds, so a prompt is the unit (its samples are averaged first; samples of one prompt are not
independent of each other). That tells a tie from a loss, which the two models' separate
standard errors cannot.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

MODELS = ("base", "pfit", "shared")
METRICS = ("helpfulness", "safety", "mixed", "kl")
REWARDS = ("helpfulness", "safety", "mixed")


def _mean_se(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return mean, se


def evaluate(
    *,
    base_dir: Path,
    rewards_dir: Path,
    prompts: dict[str, list[Any]],
    mixes: dict[str, float],
    stores: dict[str, Path],
    samples: int,
    max_new_tokens: int,
    seed: int,
) -> dict[str, dict[str, dict[str, Any]]]:
    """model -> user -> {helpfulness, safety, mixed, kl} and their standard errors (`*_se`,
    over the samples) on the user's evaluation prompts, and each reward's mean per prompt
    (`*_per_prompt`, in prompt order, for the paired comparison)."""
    from fedpersona.adapters import AdapterStore, Slot
    from fedpersona.trainer.flower.apps import model_info
    from fedpersona.trainer.learn.lora_train import load_base_model, load_tokenizer
    from fedpersona.trainer.rlhf.mix import mixed_reward
    from fedpersona.trainer.rlhf.rloo import exact_kl, prompt_text, sample
    from fedpersona.trainer.rlhf.scorer import RewardPair
    from peft import PeftModel

    info = model_info(base_dir)
    tokenizer = load_tokenizer(base_dir)
    rewards = RewardPair.load(rewards_dir)
    out: dict[str, dict[str, dict[str, Any]]] = {m: {} for m in MODELS}
    for user, user_prompts in prompts.items():
        lam = mixes[user]
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
            values: dict[str, list[float]] = {m: [] for m in METRICS}
            for i, prompt in enumerate(user_prompts):
                # The same sampling seed for every model: the comparison is paired per prompt.
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
                values["helpfulness"].extend(s.helpfulness.tolist())
                values["safety"].extend(s.safety.tolist())
                values["mixed"].extend(mixed_reward(s.helpfulness, s.safety, lam).tolist())
                if model_name == "base":
                    values["kl"].extend([0.0] * samples)
                else:
                    values["kl"].extend(exact_kl(model, rollout).tolist())
            scores: dict[str, Any] = {}
            for metric, vs in values.items():
                scores[metric], scores[f"{metric}_se"] = _mean_se(vs)
            for metric in REWARDS:
                vs = values[metric]
                scores[f"{metric}_per_prompt"] = [
                    statistics.fmean(vs[i : i + samples]) for i in range(0, len(vs), samples)
                ]
            out[model_name][user] = scores
    return out


def paired(
    scores: dict[str, dict[str, dict[str, Any]]], metric: str = "mixed"
) -> dict[str, dict[str, float]]:
    """user -> pfit minus shared on `metric`: the mean over prompts of the per-prompt
    difference, its standard error over prompts, and the number of prompts. Empty for scores
    without per-prompt means (results written before they were kept)."""
    out: dict[str, dict[str, float]] = {}
    for user, pfit in scores["pfit"].items():
        a, b = pfit.get(f"{metric}_per_prompt"), scores["shared"][user].get(f"{metric}_per_prompt")
        if not a or not b or len(a) != len(b):
            continue
        mean, se = _mean_se([x - y for x, y in zip(a, b, strict=True)])
        out[user] = {"mean": mean, "se": se, "prompts": float(len(a))}
    return out


def pool_paired(per_seed: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, Any]]:
    """The seeds' paired differences per user: each seed's, their mean, the evaluation's standard
    error of that mean (`se_eval`: prompts only, the trained policies held fixed), the spread
    between seeds (`seed_sd`, which also holds the training's randomness) and `se_seeds`
    (seed_sd / sqrt(seeds)). Only users every seed has."""
    if not per_seed:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for user in per_seed[0]:
        if not all(user in p for p in per_seed):
            continue
        rows = [p[user] for p in per_seed]
        means = [r["mean"] for r in rows]
        k = len(rows)
        seed_sd = statistics.stdev(means) if k > 1 else 0.0
        out[user] = {
            "per_seed": rows,
            "mean": statistics.fmean(means),
            "se_eval": math.sqrt(sum(r["se"] ** 2 for r in rows)) / k,
            "seed_sd": seed_sd,
            "se_seeds": seed_sd / math.sqrt(k),
        }
    return out


def targets(
    scores: dict[str, dict[str, dict[str, Any]]], mixes: dict[str, float], ratio: float
) -> dict[str, Any]:
    pfit, shared = scores["pfit"], scores["shared"]
    low = min(mixes, key=lambda u: mixes[u])
    high = max(mixes, key=lambda u: mixes[u])
    return {
        "mixed_reward_pfit_above_shared": {u: pfit[u]["mixed"] > shared[u]["mixed"] for u in mixes},
        "lambda1_more_helpful_than_lambda0": pfit[high]["helpfulness"] > pfit[low]["helpfulness"],
        "lambda0_safer_than_lambda1": pfit[low]["safety"] > pfit[high]["safety"],
        "uplink_ratio_at_most_half": ratio <= 0.5,
    }


def summarize(
    scores: dict[str, dict[str, dict[str, Any]]],
    *,
    mixes: dict[str, float],
    uplink: dict[str, float],
    reward_models: Any,
) -> dict[str, Any]:
    ratio = uplink["pfit"] / uplink["fedrlhf"] if uplink["fedrlhf"] else float("nan")
    return {
        "per_user": scores,
        "uplink_bytes_per_round": uplink,
        "uplink_ratio_pfit_vs_dense": ratio,
        "targets": targets(scores, mixes, ratio),
        "paired_mixed_pfit_minus_shared": paired(scores),
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


def combine(per_seed: dict[int, dict[str, Any]], mixes: dict[str, float]) -> dict[str, Any]:
    """The seeds' mean per model, user and metric (`*_seed_sd`: spread between seeds), the
    targets on the mean and in how many seeds each held."""
    seeds = sorted(per_seed)
    first = per_seed[seeds[0]]
    mean: dict[str, dict[str, dict[str, float]]] = {}
    for model in MODELS:
        mean[model] = {}
        for user in mixes:
            row: dict[str, float] = {}
            for metric in METRICS:
                vs = [per_seed[s]["per_user"][model][user][metric] for s in seeds]
                row[metric] = statistics.fmean(vs)
                row[f"{metric}_seed_sd"] = statistics.stdev(vs) if len(vs) > 1 else 0.0
            mean[model][user] = row
    ratio = statistics.fmean(per_seed[s]["uplink_ratio_pfit_vs_dense"] for s in seeds)
    held: dict[str, Any] = {}
    for name, value in targets(mean, mixes, ratio).items():
        if isinstance(value, dict):
            held[name] = {u: sum(per_seed[s]["targets"][name][u] for s in seeds) for u in value}
        else:
            held[name] = sum(per_seed[s]["targets"][name] for s in seeds)
    return {
        "seeds": seeds,
        "per_user": mean,
        "mixed_pfit_minus_shared": {
            u: [
                per_seed[s]["per_user"]["pfit"][u]["mixed"]
                - per_seed[s]["per_user"]["shared"][u]["mixed"]
                for s in seeds
            ]
            for u in mixes
        },
        "paired_mixed_pfit_minus_shared": pool_paired(
            [per_seed[s].get("paired_mixed_pfit_minus_shared", {}) for s in seeds]
        ),
        "uplink_ratio_pfit_vs_dense": ratio,
        "targets": targets(mean, mixes, ratio),
        "targets_held_in_seeds": held,
        "reward_models": first["reward_models"],
        "per_seed": {str(s): per_seed[s] for s in seeds},
    }


def plot(result: dict[str, Any], mixes: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    markers = {"base": "o", "pfit": "*", "shared": "s"}
    colors = ["tab:green", "tab:orange", "tab:red", "tab:blue", "tab:purple"]
    order = sorted(mixes, key=lambda u: mixes[u])
    for model, by_user in result["per_user"].items():
        for user, s in by_user.items():
            ax.errorbar(
                s["helpfulness"],
                s["safety"],
                xerr=s.get("helpfulness_seed_sd", 0.0),
                yerr=s.get("safety_seed_sd", 0.0),
                fmt=markers[model],
                color=colors[order.index(user) % len(colors)],
                markersize=12 if model == "pfit" else 7,
                capsize=2,
                label=f"{model}, {user} (λ={mixes[user]})",
            )
    seeds = result.get("seeds", [])
    ax.set_xlabel("mean helpfulness reward (evaluation prompts)")
    ax.set_ylabel("mean safety reward")
    ax.set_title(
        f"PFIT: each user's served model\nmean of seeds {seeds}, bars: sd between seeds",
        fontsize=10,
    )
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(result: dict[str, Any]) -> None:
    lines = [f"seeds {result.get('seeds')}, evaluation prompts: {result.get('split')}"]
    lines.append(f"{'model':8} {'user':8} {'help':>7} {'safe':>7} {'mixed':>7} {'KL':>7}")
    for model, by_user in result["per_user"].items():
        for user, s in by_user.items():
            lines.append(
                f"{model:8} {user:8} {s['helpfulness']:7.3f} {s['safety']:7.3f} "
                f"{s['mixed']:7.3f} {s['kl']:7.3f}"
            )
    lines.append(f"mixed, pfit - shared, per seed: {json.dumps(result['mixed_pfit_minus_shared'])}")
    for user, p in result.get("paired_mixed_pfit_minus_shared", {}).items():
        seeds = ", ".join(f"{r['mean']:+.3f} (se {r['se']:.3f})" for r in p["per_seed"])
        lines.append(
            f"paired over prompts, {user}: {seeds}; mean {p['mean']:+.3f}, "
            f"se_eval {p['se_eval']:.3f}, seed sd {p['seed_sd']:.3f}"
        )
    lines.append(f"uplink ratio pfit / dense: {result['uplink_ratio_pfit_vs_dense']:.3f}")
    lines.append(f"targets (seed mean): {json.dumps(result['targets'])}")
    lines.append(f"targets held in seeds: {json.dumps(result['targets_held_in_seeds'])}")
    lines.append(f"reward models: {json.dumps(result['reward_models'])}")
    sys.stdout.write("\n".join(lines) + "\n")
