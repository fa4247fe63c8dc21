"""The results side of `benchmarks/personalization.py`: per-seed comparisons in, the results JSON,
the printed table and the plots out. Trains and measures nothing.

Owns the issue-11 targets (`TARGET_NEEDS`, `targets`): a target is judged once every method it
compares is measured, and reported as not run (never met) when the run's `--methods` leaves one
of them out.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any


def summarize(runs: list[Any], methods: list[str], users: list[str]) -> dict[str, Any]:
    """Means and stds over seeds of the per-seed comparisons; a method counts the seeds that
    measured it (a run that stopped mid-seed has some methods one seed short: `seeds_measured`)."""

    def std(values: list[float]) -> float:
        return statistics.stdev(values) if len(values) > 1 else 0.0

    methods = [m for m in methods if any(m in r.perplexity for r in runs)]
    having = {m: [r for r in runs if m in r.perplexity] for m in methods}
    means = {m: [r.mean(m) for r in having[m]] for m in methods}
    per_user = {
        m: {u: statistics.fmean(r.perplexity[m][u] for r in having[m]) for u in users}
        for m in methods
    }
    trained = [m for m in methods if m != "base"]
    rounds = sorted({k for r in runs for m in trained for k in r.convergence.get(m, {})})
    curve = {
        m: {
            k: statistics.fmean(r.convergence[m][k] for r in runs if k in r.convergence.get(m, {}))
            for k in rounds
            if any(k in r.convergence.get(m, {}) for r in runs)
        }
        for m in trained
    }
    return {
        "mean_perplexity": {m: statistics.fmean(v) for m, v in means.items()},
        "std_perplexity": {m: std(v) for m, v in means.items()},
        "per_seed_mean_perplexity": means,
        "seeds_measured": {m: len(v) for m, v in means.items()},
        "per_user_perplexity": per_user,
        "convergence": curve,
        "uplink_bytes_per_round": {m: having[m][0].uplink_bytes_per_round[m] for m in trained},
        "downlink_bytes_per_round": {m: having[m][0].downlink_bytes_per_round[m] for m in trained},
        "train_seconds": {
            m: statistics.fmean(r.train_seconds[m] for r in having[m]) for m in trained
        },
    }


def load_seed(path: Path) -> Any:
    """A seed's `Comparison` back from its comparison.json (round keys as ints again)."""
    from fedpersona.trainer.commands.eval import Comparison

    data = json.loads(path.read_text(encoding="utf-8"))
    return Comparison(
        users=data["users"],
        perplexity=data["perplexity"],
        uplink_bytes_per_round=data["uplink_bytes_per_round"],
        downlink_bytes_per_round=data["downlink_bytes_per_round"],
        train_seconds=data["train_seconds"],
        runs=data["runs"],
        settings=data["settings"],
        convergence={m: {int(k): v for k, v in c.items()} for m, c in data["convergence"].items()},
        options=data["method_options"],
    )


def merge(into: Any, one: Any) -> None:
    """Add the methods of comparison `one` to `into` (same seed, same users)."""
    for name in (
        "perplexity",
        "uplink_bytes_per_round",
        "downlink_bytes_per_round",
        "train_seconds",
        "runs",
        "convergence",
        "options",
    ):
        getattr(into, name).update(getattr(one, name))
    into.settings = {**one.settings, "methods": list(into.perplexity)}


# The issue-11 targets and the methods each one compares.
TARGET_NEEDS: dict[str, tuple[str, ...]] = {
    "pftt_10pct_below_fedavg": ("pftt", "fedavg"),
    "perfit_10pct_below_fedavg": ("perfit", "fedavg"),
    "best_23pct_below_fedavg": ("pftt", "perfit", "fedavg"),
    "both_below_fedavg_ft": ("pftt", "perfit", "fedavg-ft"),
    "both_below_local": ("pftt", "perfit", "local"),
    "no_user_2pct_worse_than_fedavg": ("pftt", "perfit", "fedavg"),
    "pftt_uplink_at_most_half_fedavg": ("pftt", "fedavg"),
}


def targets(
    summary: dict[str, Any], users: list[str], methods: list[str]
) -> tuple[dict[str, bool], dict[str, list[str]]]:
    """The issue-11 targets: (name -> met, for those whose methods are all measured; name ->
    the methods it needs that `methods` (the run's --methods) leaves out: never judged)."""
    mean, per_user = summary["mean_perplexity"], summary["per_user_perplexity"]
    up = summary["uplink_bytes_per_round"]
    not_run = {
        name: [m for m in needs if m not in methods]
        for name, needs in TARGET_NEEDS.items()
        if any(m not in methods for m in needs)
    }
    ready = [n for n, needs in TARGET_NEEDS.items() if n not in not_run and set(needs) <= set(mean)]
    personal = [m for m in ("pftt", "perfit") if m in mean]

    def worst(m: str) -> float:
        return max(per_user[m][u] / per_user["fedavg"][u] - 1 for u in users)

    checks = {
        "pftt_10pct_below_fedavg": lambda: mean["pftt"] <= 0.90 * mean["fedavg"],
        "perfit_10pct_below_fedavg": lambda: mean["perfit"] <= 0.90 * mean["fedavg"],
        "best_23pct_below_fedavg": lambda: min(mean[m] for m in personal) <= 0.77 * mean["fedavg"],
        "both_below_fedavg_ft": lambda: max(mean[m] for m in personal) < mean["fedavg-ft"],
        "both_below_local": lambda: max(mean[m] for m in personal) < mean["local"],
        "no_user_2pct_worse_than_fedavg": lambda: max(worst(m) for m in personal) <= 0.02,
        "pftt_uplink_at_most_half_fedavg": lambda: up["pftt"] <= 0.5 * up["fedavg"],
    }
    return {name: bool(checks[name]()) for name in ready}, not_run


def report(
    runs: list[Any],
    *,
    methods: list[str],
    users: list[str],
    settings: dict[str, Any],
    selection: dict[str, Any],
    fedavg_at: dict[str, float],
    wire_dtype: str,
) -> dict[str, Any]:
    """The results JSON of the seeds done so far."""
    summary = summarize(runs, methods, users)
    per_user = summary["per_user_perplexity"]
    up = summary["uplink_bytes_per_round"]
    if "fedavg" not in per_user:  # nothing to compare with yet
        return {
            "settings": settings,
            "selection": selection,
            **summary,
            "targets_met": {},
            "targets_not_run": targets(summary, users, methods)[1],
        }
    fedavg = summary["mean_perplexity"]["fedavg"]
    met, not_run = targets(summary, users, methods)
    return {
        "settings": settings,
        "selection": selection,
        **summary,
        "reduction_vs_fedavg": {m: 1 - v / fedavg for m, v in summary["mean_perplexity"].items()},
        "worst_user_vs_fedavg": {
            m: max(per_user[m][u] / per_user["fedavg"][u] - 1 for u in users)
            for m in per_user
            if m not in ("base", "fedavg")
        },
        "uplink": {
            "pftt_wire_dtype": wire_dtype,
            "fedavg_float32_computed": fedavg_at["float32"],
            f"fedavg_{wire_dtype}_computed": fedavg_at[wire_dtype],
            "pftt_over_fedavg": up["pftt"] / up["fedavg"] if "pftt" in up else None,
            f"pftt_over_fedavg_{wire_dtype}": (
                up["pftt"] / fedavg_at[wire_dtype] if "pftt" in up else None
            ),
        },
        "targets_met": met,
        "targets_not_run": not_run,
    }


def print_table(result: dict[str, Any], methods: list[str], users: list[str]) -> None:
    mean, std = result["mean_perplexity"], result["std_perplexity"]
    methods = [m for m in methods if m in mean]  # a partial report has what was measured
    print(f"{'user':>18} " + " ".join(f"{m:>10}" for m in methods))
    for user in users:
        row = " ".join(f"{result['per_user_perplexity'][m][user]:10.2f}" for m in methods)
        print(f"{user:>18} {row}")
    for m in methods:
        r = result.get("reduction_vs_fedavg", {}).get(m, 0.0)
        print(
            f"{m:>10}: {mean[m]:9.2f} ± {std[m]:6.2f}  ({abs(r):.1%} "
            f"{'below' if r >= 0 else 'above'} FedAvg)  up/round "
            f"{result['uplink_bytes_per_round'].get(m, 0):,.0f} B  down/round "
            f"{result['downlink_bytes_per_round'].get(m, 0):,.0f} B"
        )
    uplink = result.get("uplink", {})
    if uplink.get("pftt_over_fedavg") is not None:
        print(
            f"PFTT uplink / FedAvg's: {uplink['pftt_over_fedavg']:.2%} (PFTT ships "
            f"{uplink['pftt_wire_dtype']}); vs FedAvg in the same dtype: "
            f"{uplink['pftt_over_fedavg_' + uplink['pftt_wire_dtype']]:.2%}"
        )
    for name, ok in result["targets_met"].items():
        print(f"{'MET   ' if ok else 'MISSED'} {name}")
    for name, missing in result.get("targets_not_run", {}).items():
        print(f"NOT RUN {name} (needs {', '.join(missing)})")
    print(f"chosen on validation: {result['selection']['chosen']}")
    print(f"seeds: {result['settings']['seeds']} (complete: {result['complete']})")


def save_plots(summary: dict[str, Any], users: list[str], stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_user, mean, std = (
        summary["per_user_perplexity"],
        summary["mean_perplexity"],
        summary["std_perplexity"],
    )
    methods = list(per_user)
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(max(9.0, 1.2 * len(users) + 5), 4.8), gridspec_kw={"width_ratios": [3, 1]}
    )
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        xs = [u + (i - (len(methods) - 1) / 2) * width for u in range(len(users))]
        left.bar(xs, [per_user[m][u] for u in users], width, label=m)
    left.set_xticks(range(len(users)), users, rotation=45, ha="right")
    left.set_yscale("log")
    left.set_ylabel("held-out perplexity (mean over seeds)")
    left.set_title("per-user perplexity")
    left.legend(fontsize="small", ncol=2)
    right.bar(methods, [mean[m] for m in methods], yerr=[std[m] for m in methods], color="gray")
    right.set_title("mean ± std over seeds")
    right.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    users_png = stem.with_suffix(".png")
    fig.savefig(users_png, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for m, curve in summary["convergence"].items():
        if curve:
            ax.plot(list(curve), list(curve.values()), marker="o", label=m)
    if "base" in mean:
        ax.axhline(mean["base"], color="black", linestyle=":", label="base")
    ax.set_xticks(sorted({k for curve in summary["convergence"].values() for k in curve}))
    ax.set_xlabel("round")
    ax.set_ylabel("mean held-out perplexity of the served adapters")
    ax.set_title("convergence per round")
    ax.legend(fontsize="small")
    fig.tight_layout()
    curve_png = stem.with_name(stem.name + "-convergence.png")
    fig.savefig(curve_png, dpi=120)
    plt.close(fig)
    return [users_png, curve_png]
