"""`fedpersona eval`: per-user held-out perplexity of the base model and of each method.

    fedpersona eval --home DIR --rounds 3 [--methods base,fedavg,pftt] [--users ...]
                    [--base-model DIR]

For every method this trains a fresh federated run (Flower's Simulation Engine, the same path as
`fedpersona train`) on the home's silos and base model (`--base-model`, default
`<home>/models/large`), into a store of its own under `<out>/<method>/` so the methods never
overwrite each other's served adapters; then it computes, for every user, the perplexity of the
adapter that user is served on their `eval.jsonl`, which no training step ever reads
(`fedpersona.trainer.learn.evaluate`). `base` is the base model without an adapter. The methods
are every registered method whose behaviour serves each user a LoRA on the large model (FedPT's
proxy experts are measured by `benchmarks/proxy_tuning.py`). The training flags are generated
from `RoundSpec` (`fedpersona.trainer.commands.spec_args`). `--no-train` re-evaluates the
stores of an earlier `eval` run.

Every method's run starts from clean client state (`resume = False`: no personal state an
earlier run left in a silo is read, `fedpersona.trainer.flower.client_state`). `compare` takes
per-method options (e.g. PFTT's `global_rank`, `personal_round`), which reach every client
through the run's method factory, and can measure each round's served adapters too
(`convergence`). Uplink and downlink are averaged over the rounds that uploaded something (a
personalization round uploads nothing).

Writes `<out>/comparison.json` (per-user perplexities, means, uplink bytes per round, run ids)
and `<out>/comparison.png`, and prints both tables.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpersona.adapters import AdapterStore, Slot, load_lora
from fedpersona.trainer.commands.spec_args import add_spec_arguments, comma_list, spec_from_args
from fedpersona.trainer.flower.runconfig import RunConfig
from fedpersona.trainer.methods import (
    LoraSpec,
    Method,
    Product,
    behaviour_of,
    get_method,
    method_names,
)
from fedpersona.trainer.rounds.records import RoundSpec, RunRecords, RunState

log = logging.getLogger(__name__)

BASE = "base"  # the base model without an adapter: the reference every method is compared to


def evaluable_methods() -> tuple[str, ...]:
    """`base` and every registered method that serves each user a LoRA on the large model."""
    served = tuple(
        n
        for n in method_names()
        if Product.SERVED in behaviour_of(n).publishes and not behaviour_of(n).rewards
    )
    return (BASE, *served)


@dataclass
class Comparison:
    """The outcome of an evaluation, as plain data (what comparison.json holds)."""

    users: list[str]
    perplexity: dict[str, dict[str, float]] = field(default_factory=dict)  # method -> user -> ppl
    uplink_bytes_per_round: dict[str, float] = field(default_factory=dict)
    downlink_bytes_per_round: dict[str, float] = field(default_factory=dict)
    train_seconds: dict[str, float] = field(default_factory=dict)
    runs: dict[str, str] = field(default_factory=dict)
    settings: dict[str, object] = field(default_factory=dict)
    # method -> round -> mean perplexity over users of the adapters served after that round
    convergence: dict[str, dict[int, float]] = field(default_factory=dict)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def mean(self, method: str) -> float:
        return statistics.fmean(self.perplexity[method].values())

    def to_json(self) -> dict[str, object]:
        return {
            "settings": self.settings,
            "users": self.users,
            "perplexity": self.perplexity,
            "mean_perplexity": {m: self.mean(m) for m in self.perplexity},
            "uplink_bytes_per_round": self.uplink_bytes_per_round,
            "downlink_bytes_per_round": self.downlink_bytes_per_round,
            "train_seconds": self.train_seconds,
            "runs": self.runs,
            "convergence": self.convergence,
            "method_options": self.options,
        }


def method_home(out: Path, method: str) -> Path:
    return out / method


def configured_method(
    config: RunConfig, *, options: Mapping[str, Mapping[str, Any]] | None = None
) -> Method:
    """The run's method with its LoRA rank (alpha = 2 x rank) and this comparison's options."""
    spec = config.spec
    extra = dict((options or {}).get(spec.algorithm, {}))
    return get_method(spec.algorithm, spec=LoraSpec(rank=spec.rank, alpha=2.0 * spec.rank), **extra)


def method_run_config(
    *, home: Path, out: Path, run_id: str, spec: RoundSpec, users: list[str], base_model: Path
) -> RunConfig:
    """The run config of one method's fresh run: its own store and runs, the given base model."""
    from fedpersona.trainer.flower.runconfig import config_of

    where = method_home(out, spec.algorithm)
    return config_of(
        spec,
        run_id=run_id,
        home=home,
        users=tuple(users),
        store=where / "store",
        runs_dir=where / "runs",
        base_model=base_model,
        resume=False,
    )


def train_method(
    *,
    home: Path,
    out: Path,
    method: str,
    spec: RoundSpec,
    users: list[str],
    base_model: Path,
    cpus: int | None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """One fresh federated run of `method` into `<out>/<method>/store`; returns the run id.

    Fresh: a new store, no global checkpoint and no client state of an earlier run."""
    from fedpersona.trainer.flower.simulation import simulate

    method_spec = spec.model_copy(update={"algorithm": method})
    status = RunRecords(method_home(out, method) / "runs").create(method_spec, users=users)
    config = method_run_config(
        home=home,
        out=out,
        run_id=status.id,
        spec=method_spec,
        users=users,
        base_model=base_model,
    )
    factory = functools.partial(configured_method, options=dict(options or {}))
    final = simulate(config, cpus=cpus, method_factory=factory)
    if final.state != RunState.succeeded:
        raise RuntimeError(f"{method}: training run {final.id} failed: {final.error}")
    return final.id


def evaluate_method(
    *,
    home: Path,
    out: Path,
    method: str,
    users: list[str],
    base_model: Path,
    max_len: int,
    versions: Mapping[str, str] | None = None,
) -> dict[str, float]:
    """Each user's held-out perplexity with the adapter `method` serves them (base: none);
    `versions` (user -> served version id) measures those versions instead of the current."""
    from fedpersona.trainer.flower.apps import model_info
    from fedpersona.trainer.learn.evaluate import perplexity

    base = model_info(base_model)
    store = None if method == BASE else AdapterStore(method_home(out, method) / "store")
    result = {}
    for user in users:
        adapter = None
        if store is not None:
            slot = Slot.user_served(user)
            version = store.get(slot, versions[user]) if versions else store.current(slot)
            if version is None:
                raise RuntimeError(f"{method}: no served adapter for {user} in {store.root}")
            adapter = load_lora(version.path)
        result[user] = perplexity(base, adapter, home / "silos" / user, "eval", max_len=max_len)
        log.info("%s / %s: perplexity %.3f", method, user, result[user])
    return result


def convergence(
    *,
    home: Path,
    out: Path,
    method: str,
    run_id: str,
    users: list[str],
    base_model: Path,
    max_len: int,
    final: float | None = None,
) -> dict[int, float]:
    """Round -> mean perplexity over users of the adapters served after that round (rounds
    that served not every user, or whose versions the store no longer retains, are left out).
    `final`: the last such round's value when the caller already measured it (its served
    adapters are the final ones), so it is not evaluated twice."""
    from fedpersona.adapters import AdapterError

    status = RunRecords(method_home(out, method) / "runs").read(run_id)
    rounds = [r for r in status.rounds or [] if set(r.served_versions) >= set(users)]
    curve: dict[int, float] = {}
    if final is not None and rounds:
        curve[rounds[-1].round] = final
        rounds = rounds[:-1]
    for record in rounds:
        try:
            ppl = evaluate_method(
                home=home,
                out=out,
                method=method,
                users=users,
                base_model=base_model,
                max_len=max_len,
                versions=record.served_versions,
            )
        except AdapterError:
            continue
        curve[record.round] = statistics.fmean(ppl.values())
    return curve


def traffic(out: Path, method: str, run_id: str) -> tuple[float, float, float]:
    """(mean uplink bytes per round, mean downlink bytes per round, total wall seconds), the
    means over the rounds that uploaded something (all rounds if none did: local-only)."""
    status = RunRecords(method_home(out, method) / "runs").read(run_id)
    rounds = status.rounds or []
    if not rounds:
        return 0.0, 0.0, 0.0
    sending = [r for r in rounds if r.bytes_up > 0] or rounds
    up = statistics.fmean(r.bytes_up for r in sending)
    down = statistics.fmean(r.bytes_down for r in sending)
    return up, down, sum(r.wall_s for r in rounds)


def compare(
    *,
    home: Path,
    out: Path,
    methods: list[str],
    users: list[str],
    spec: RoundSpec,
    base_model: Path,
    train: bool = True,
    cpus: int | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    per_round: bool = False,
) -> Comparison:
    """Train (unless `train=False`) and evaluate every method; nothing here reads eval data
    before all training is done. `per_round` also measures every round's served adapters."""
    chosen: dict[str, dict[str, Any]] = {m: dict(o) for m, o in (options or {}).items()}
    comparison = Comparison(
        users=users,
        settings={
            **spec.model_dump(mode="json", exclude={"algorithm"}),
            "methods": methods,
            "home": str(home),
        },
        options=chosen,
    )
    for method in methods:
        if method == BASE:
            continue
        if train:
            comparison.runs[method] = train_method(
                home=home,
                out=out,
                method=method,
                spec=spec,
                users=users,
                base_model=base_model,
                cpus=cpus,
                options=options,
            )
        else:
            records = RunRecords(method_home(out, method) / "runs").list_all()
            done = [r for r in records if r.state == RunState.succeeded]
            if not done:
                raise RuntimeError(f"{method}: no finished run under {method_home(out, method)}")
            comparison.runs[method] = done[-1].id
        up, down, seconds = traffic(out, method, comparison.runs[method])
        comparison.uplink_bytes_per_round[method] = up
        comparison.downlink_bytes_per_round[method] = down
        comparison.train_seconds[method] = seconds
    for method in methods:
        comparison.perplexity[method] = evaluate_method(
            home=home,
            out=out,
            method=method,
            users=users,
            base_model=base_model,
            max_len=spec.max_len,
        )
        if per_round and method != BASE:
            comparison.convergence[method] = convergence(
                home=home,
                out=out,
                method=method,
                run_id=comparison.runs[method],
                users=users,
                base_model=base_model,
                max_len=spec.max_len,
            )
    return comparison


def save(comparison: Comparison, out: Path, *, stem: str = "comparison") -> tuple[Path, Path]:
    """Write `<stem>.json` and `<stem>.png` under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{stem}.json"
    json_path.write_text(json.dumps(comparison.to_json(), indent=2) + "\n", encoding="utf-8")
    png_path = out / f"{stem}.png"
    save_chart(comparison, png_path)
    return json_path, png_path


def save_chart(comparison: Comparison, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(comparison.perplexity)
    users = comparison.users
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(max(8.0, 1.1 * len(users) + 4), 4.5), gridspec_kw={"width_ratios": [3, 1]}
    )
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        xs = [u + (i - (len(methods) - 1) / 2) * width for u in range(len(users))]
        left.bar(xs, [comparison.perplexity[method][u] for u in users], width, label=method)
    left.set_xticks(range(len(users)), users, rotation=45, ha="right")
    left.set_ylabel("held-out perplexity (lower is better)")
    left.set_yscale("log")
    left.legend(fontsize="small")
    left.set_title("per-user perplexity")
    sent = [m for m in methods if m in comparison.uplink_bytes_per_round]
    right.bar(sent, [comparison.uplink_bytes_per_round[m] / 1024 for m in sent], color="gray")
    right.set_ylabel("uplink KiB per round (all clients)")
    right.set_title("communication")
    right.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(comparison: Comparison) -> None:
    from rich.console import Console
    from rich.table import Table

    methods = list(comparison.perplexity)
    table = Table(title="held-out perplexity per user (lower is better)")
    table.add_column("user")
    for method in methods:
        table.add_column(method, justify="right")
    for user in comparison.users:
        table.add_row(user, *(f"{comparison.perplexity[m][user]:.2f}" for m in methods))
    table.add_row("[bold]mean", *(f"[bold]{comparison.mean(m):.2f}" for m in methods))
    traffic_table = Table(title="communication per round (all clients)")
    for column in ("method", "uplink bytes", "downlink bytes", "train s"):
        traffic_table.add_column(column, justify="right")
    for method, up in comparison.uplink_bytes_per_round.items():
        traffic_table.add_row(
            method,
            f"{up:,.0f}",
            f"{comparison.downlink_bytes_per_round[method]:,.0f}",
            f"{comparison.train_seconds[method]:.1f}",
        )
    console = Console()
    console.print(table)
    console.print(traffic_table)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", type=Path, default=None, help="fedpersona home (FEDPERSONA_HOME)")
    parser.add_argument("--out", type=Path, default=None, help="default <home>/eval")
    parser.add_argument(
        "--methods",
        type=comma_list,
        default=evaluable_methods(),
        help=f"comma-separated (default: {','.join(evaluable_methods())})",
    )
    add_spec_arguments(
        parser.add_argument_group("training (RoundSpec)"),
        exclude={"algorithm"},
        defaults={"rounds": 3},
    )
    parser.add_argument(
        "--base-model",
        type=Path,
        default=None,
        help="the large model every method trains and is evaluated on "
        "(default <home>/models/large)",
    )
    parser.add_argument("--cpus", type=int, default=None, help="ClientApps training at once")
    parser.add_argument("--no-train", action="store_true", help="evaluate the stores under --out")
    parser.add_argument("--json", action="store_true", help="print comparison.json to stdout")


def run(args: argparse.Namespace) -> int:
    from fedpersona.trainer.commands.train import resolve_home
    from fedpersona.trainer.errors import TrainerError
    from fedpersona.trainer.rounds.lock import resolve_users

    home = resolve_home(args.home)
    out = (args.out or home / "eval").resolve()
    methods = list(args.methods)
    unknown = sorted(set(methods) - set(evaluable_methods()))
    if unknown or not methods:
        log.error(
            "cannot evaluate methods %s; choose from %s (methods publishing proxy experts are "
            "measured by benchmarks/proxy_tuning.py)",
            unknown,
            ", ".join(evaluable_methods()),
        )
        return 2
    try:
        users = resolve_users(home, args.users)
        spec = spec_from_args(args, users=tuple(users))
        comparison = compare(
            home=home,
            out=out,
            methods=methods,
            users=users,
            spec=spec,
            base_model=(args.base_model or home / "models" / "large").resolve(),
            train=not args.no_train,
            cpus=args.cpus,
        )
    except (TrainerError, ValueError, RuntimeError) as e:
        log.error("%s", e)
        return 2
    json_path, png_path = save(comparison, out)
    if args.json:
        print(json.dumps(comparison.to_json(), indent=2))
    else:
        render(comparison)
        log.info("wrote %s and %s", json_path, png_path)
    return 0 if all(math.isfinite(comparison.mean(m)) for m in methods) else 1
