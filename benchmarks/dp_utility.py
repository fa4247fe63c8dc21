"""DP utility benchmark: held-out perplexity at epsilon in {1, 8, inf} (central DP, shared part).

    python benchmarks/dp_utility.py --corpus ../shared/data/tinyshakespeare.txt

The personalization benchmark's quick mode (`benchmarks/personalization.py --quick`: its
Shakespeare population of 3 speakers, 12 train chats each, the micro model pretrained on the
corpus minus every held-out chat, 2 rounds x 2 local steps, batch 2, 64 tokens, rank 4, lr 5e-3),
with its population and spec taken from that module. Per method (FedAvg: everything shared;
PFTT: a shared and a personal LoRA, only the shared one leaves the silo and is noised) and per
target epsilon:
- the noise multiplier is `fedpersona.trainer.privacy.noise_for(epsilon, rounds, delta)`;
- every run clips each client's update of the shared part to the same `clip_norm` (the median
  norm of the clients' first-round updates, measured once before the runs; `inf` = clipping, no
  noise, so the columns differ by the noise only), and the server adds Gaussian noise of std
  `noise * clip_norm / n` to the clipped mean (`fedpersona.trainer.methods.robust`);
- a real Simulation Engine run (`fedpersona.trainer.commands.eval.compare`), then every user's
  held-out perplexity of the adapter they are served; the run record's accounted epsilon is
  reported beside the target. A plain run (no clipping, no noise) and the base model are the
  references.
Writes `benchmarks/results/dp-utility-<population>-quick.{json,png}` and prints a table.

Choosing the clip norm from the clients' own updates spends privacy that the accountant does not
count; a deployment fixes it beforehand. Here it only makes the three epsilons comparable.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
EPSILONS = (math.inf, 8.0, 1.0)
METHODS = ("fedavg", "pftt")
# PFTT as the personalization benchmark's quick grid tries it first (no selection here).
OPTIONS: dict[str, dict[str, Any]] = {"pftt": {"personal_round": True}}


def label(epsilon: float) -> str:
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


def clip_norms(
    *, base: Any, home: Path, users: list[str], spec: Any, methods: tuple[str, ...]
) -> dict[str, float]:
    """Per method: the median L2 norm of the users' first-round updates of the shared part,
    trained with the configuration the ClientApp uses (`apps.train_config`: per-user seeds)."""
    from fedpersona.trainer.flower.apps import train_config
    from fedpersona.trainer.flower.runconfig import config_of
    from fedpersona.trainer.methods import LoraSpec, get_method
    from fedpersona.trainer.methods.robust import update_norm

    out: dict[str, float] = {}
    for name in methods:
        method = get_method(
            name, spec=LoraSpec(rank=spec.rank, alpha=2.0 * spec.rank), **OPTIONS.get(name, {})
        )
        run = config_of(
            spec.model_copy(update={"algorithm": name}),
            run_id="r-20000101t000000-000000",
            home=home,
            users=tuple(users),
            base_model=base.path,
        )
        previous = method.init_global(base_model=base, seed=spec.seed)
        norms = []
        for user in users:
            update = method.client_update(
                base_model=base, silo=home / "silos" / user, global_params=previous, state={},
                config=train_config(run, round_idx=1, user=user), round_idx=1,
            )  # fmt: skip
            norms.append(update_norm({k: update.upload[k] - previous[k] for k in previous}))
        out[name] = float(statistics.median(norms))
    return out


def accounted_epsilon(out: Path, method: str) -> float | None:
    """The epsilon the run's last round record carries (None without DP)."""
    from fedpersona.trainer.commands.eval import method_home
    from fedpersona.trainer.rounds.records import RunRecords

    run = RunRecords(method_home(out, method) / "runs").list_all()[-1]
    return run.rounds[-1].epsilon if run.rounds else None


def save_plot(result: dict[str, Any], stem: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    columns = ["plain", *(label(e) for e in EPSILONS)]
    for method in METHODS:
        row = result["mean_perplexity"][method]
        ax.plot(columns, [row[c] for c in columns], marker="o", label=method)
    ax.axhline(result["mean_perplexity"]["base"], color="black", linestyle=":", label="base")
    ax.set_yscale("log")
    ax.set_xlabel("epsilon (plain: no clipping, no noise)")
    ax.set_ylabel("mean held-out perplexity")
    ax.set_title(f"central DP on the shared part ({result['settings']['rounds']} rounds)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    png = stem.with_suffix(".png")
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--corpus", type=Path, required=True, help="tinyshakespeare.txt")
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "bench-dp-utility")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--resume", action="store_true", help="reuse the finished runs of an earlier invocation"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    log = logging.getLogger("benchmark")

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fedpersona.trainer.commands.eval import compare, method_home
    from fedpersona.trainer.models.basemodel import RECIPES, build_models
    from fedpersona.trainer.privacy import noise_for
    from fedpersona.trainer.rounds.records import RoundSpec, RunRecords, RunState
    from personalization import BENCHMARK_SPEC, QUICK_SPEC, build_population

    started = time.monotonic()
    # The personalization benchmark's quick population (its --quick settings).
    population = argparse.Namespace(
        population="shakespeare", corpus=args.corpus, users=3, max_train=12
    )
    home = args.work / "home"
    users, text, facts = build_population(population, home)
    base = build_models(home / "models", RECIPES["micro"], text, progress=False).large
    spec = RoundSpec(algorithm="fedavg", users=tuple(users), **{**BENCHMARK_SPEC, **QUICK_SPEC})
    log.info("population and base model ready after %.0f s", time.monotonic() - started)
    clips = clip_norms(base=base, home=home, users=users, spec=spec, methods=METHODS)
    log.info("clip norms (median first-round update norm): %s", clips)

    def run(name: str, methods: list[str], updates: dict[str, dict[str, Any]]) -> Any:
        """One comparison; `updates` are per-method spec changes (compare takes one spec, so
        each method trains in its own call when they differ)."""
        merged = None
        for method in methods:
            done = [
                r
                for r in RunRecords(method_home(args.work / name, method) / "runs").list_all()
                if r.state == RunState.succeeded
            ]
            one = compare(
                home=home,
                out=args.work / name,
                methods=[method],
                train=method == "base" or not (args.resume and done),
                users=users,
                spec=spec.model_copy(update=updates.get(method, {})),
                base_model=base.path,
                cpus=args.cpus,
                options=OPTIONS,
            )
            if merged is None:
                merged = one
            else:
                merged.perplexity.update(one.perplexity)
                merged.train_seconds.update(one.train_seconds)
        return merged

    trained = list(METHODS)
    per_user: dict[str, dict[str, dict[str, float]]] = {m: {} for m in trained}
    mean: dict[str, dict[str, float]] = {m: {} for m in trained}
    noise: dict[str, float] = {}
    accounted: dict[str, dict[str, float | None]] = {m: {} for m in trained}
    train_seconds: dict[str, dict[str, float]] = {m: {} for m in trained}
    plain = run("plain", ["base", *trained], {})
    for m in trained:
        per_user[m]["plain"] = plain.perplexity[m]
        mean[m]["plain"] = plain.mean(m)
        train_seconds[m]["plain"] = plain.train_seconds[m]
    base_ppl = plain.mean("base")
    for epsilon in EPSILONS:
        column = label(epsilon)
        sigma = noise_for(epsilon=epsilon, rounds=spec.rounds, delta=args.delta)
        noise[column] = sigma
        updates = {
            m: {"clip_norm": clips[m], "dp_noise": sigma, "dp_delta": args.delta} for m in trained
        }
        got = run(f"eps-{column}", trained, updates)
        for m in trained:
            per_user[m][column] = got.perplexity[m]
            mean[m][column] = got.mean(m)
            accounted[m][column] = accounted_epsilon(args.work / f"eps-{column}", m)
            train_seconds[m][column] = got.train_seconds[m]
        log.info(
            "epsilon %s (noise %.3f): %s", column, sigma, {m: mean[m][column] for m in trained}
        )
    result = {
        "settings": {
            **spec.model_dump(mode="json", exclude={"algorithm", "seed"}),
            "population": "shakespeare",
            "quick": True,
            "model": base.name,
            "delta": args.delta,
            "methods": trained,
            "method_options": OPTIONS,
            "command": " ".join(sys.argv if argv is None else ["dp_utility.py", *argv]),
            **facts,
        },
        "clip_norm": clips,
        "noise_multiplier": noise,
        "noise_std_over_clip": {c: s / len(users) for c, s in noise.items()},
        "accounted_epsilon": accounted,
        "accounting_note": "the accountant counts every round; PFTT's last round (the "
        "personalization round) uploads nothing, so its epsilon is an upper bound",
        "train_seconds": train_seconds,
        "mean_perplexity": {"base": base_ppl, **mean},
        "per_user_perplexity": {"base": plain.perplexity["base"], **per_user},
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / "dp-utility-shakespeare-quick"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    png = save_plot(result, stem)

    from rich.console import Console
    from rich.table import Table

    columns = ["plain", *(label(e) for e in EPSILONS)]
    table = Table(
        title=f"held-out perplexity, central DP (delta {args.delta:g}, {spec.rounds} rounds, "
        f"{len(users)} users; base {base_ppl:.2f})"
    )
    table.add_column("method")
    for c in columns:
        table.add_column(c if c == "plain" else f"eps {c}", justify="right")
    for m in trained:
        table.add_row(m, *(f"{mean[m][c]:.2f}" for c in columns))
    table.add_row("noise mult.", "-", *(f"{noise[c]:.3f}" for c in columns[1:]))
    Console().print(table)
    Console().print(f"saved {stem.with_suffix('.json')} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
