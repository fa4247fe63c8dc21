"""Acceptance benchmark: federated personalization under the protocol of docs/evaluation.md.

    python benchmarks/personalization.py --population shakespeare \
        --corpus ../shared/data/tinyshakespeare.txt            # Shakespeare speakers
    python benchmarks/personalization.py --population pydocs   # stdlib packages as users
    python benchmarks/personalization.py ... --quick           # smoke run (micro model, minutes)
    python benchmarks/personalization.py ... --methods base,fedavg,pftt   # a subset of methods

1. Users: `shakespeare` converts the corpus (`fedpersona data shakespeare`: the speakers with the
   most turns, each speaker's last 15% of turns held out); `pydocs` builds silos from the Python
   standard library's docstrings (`fedpersona.trainer.data.pydocs`, PSF licence).
2. Base model: `--base-model DIR` (e.g. an imported SmolLM2-135M-Instruct), else the `--recipe`
   model pretrained on the population's text *minus every held-out chat*.
3. Selection, on a validation home carved from each user's train split
   (`fedpersona.trainer.data.validation`), seed 0: each candidate of `GRID` trains and is scored
   by its mean validation perplexity; the best candidate of each method is kept. The held-out
   split is not read in this step.
4. Final: every method (`fedpersona.trainer.commands.eval.evaluable_methods`: base, FedAvg,
   FedProx, local-only, FedAvg + fine-tuning, FedSA-LoRA, PFTT, PerFIT) trains a fresh run per
   seed with the chosen options (same rounds x local steps x batch and rank budget for all),
   then each user's held-out perplexity of the adapter they are served, and per round.
   `--methods` measures a subset (and searches only its methods' candidates).
5. Reports mean ± std over seeds, the per-user table (mean over seeds), uplink and downlink bytes
   per federated round (and FedAvg's uplink were it shipped in PFTT's wire dtype, the fair
   ratio), the issue-11 targets as MET / MISSED / NOT RUN (`personalization_report`), and saves
   `benchmarks/results/<stem>.{json,png}` and `<stem>-convergence.png` (`--stem`, default
   `personalization-<population>[-quick]`). The JSON is rewritten after every seed
   (`"complete": false` until the last), so a run that dies leaves the seeds it finished;
   `--resume` reuses the selection and the finished seeds of the same `--work` folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fedpersona.trainer.commands.spec_args import add_spec_arguments, spec_from_args
from personalization_report import load_seed, merge, print_table, report, save_plots

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
# The benchmark's settings where they differ from RoundSpec's defaults (rank 8 is FedAvg's LoRA
# rank, the budget every method gets).
BENCHMARK_SPEC = {"rounds": 3, "lr": 5e-3}
QUICK_SPEC = {"rounds": 2, "local_steps": 2, "batch_size": 2, "max_len": 64, "rank": 4}
# Candidates per method, chosen on validation. The personalization round (docs/evaluation.md)
# is a candidate option of PFTT and PerFIT; PFTT's global/personal split is one too.
GRID: dict[str, list[dict[str, Any]]] = {
    "pftt": [
        {"personal_round": True},
        {"personal_round": True, "global_rank": "quarter"},
        {"personal_round": False},
    ],
    "perfit": [{"personal_round": True}, {"personal_round": False}],
}
# A real base model on 2 cores affords two candidates: PFTT with and without the
# personalization round (PerFIT keeps the choice its full-grid validation made on TINY).
SMALL_GRID: dict[str, list[dict[str, Any]]] = {
    "pftt": [{"personal_round": False}, {"personal_round": True}],
}
QUICK_GRID: dict[str, list[dict[str, Any]]] = {
    "pftt": [{"personal_round": True}, {"personal_round": True, "global_rank": "quarter"}]
}
# The learning rate searched per method on validation (`--grid lr`): every trainable method of
# the headline comparison gets the same two candidates, the benchmark's 5e-3 and twice it (the
# per-round curves were still falling at round 3). PFTT keeps the personalization-round choice
# its validation made on this population before (without); PerFIT its default (without).
LR_CANDIDATES = (5e-3, 1e-2)
LR_GRID: dict[str, list[dict[str, Any]]] = {
    method: [{**fixed, "lr": lr} for lr in LR_CANDIDATES]
    for method, fixed in (
        ("fedavg", {}),
        ("pftt", {"personal_round": False}),
        ("perfit", {"personal_round": False}),
        ("local", {}),
        ("fedavg-ft", {}),
    )
}
# After the learning rate (`--grid split`, same work folder: the first candidates are the lr
# search's choices, reused): PFTT's global/personal rank split, PerFIT's personalization round.
SPLIT_GRID: dict[str, list[dict[str, Any]]] = {
    "pftt": [
        {"personal_round": False, "lr": 5e-3},
        {"personal_round": False, "global_rank": "quarter", "lr": 5e-3},
    ],
    "perfit": [
        {"personal_round": False, "lr": 5e-3},
        {"personal_round": True, "lr": 5e-3},
    ],
}
GRIDS = {"full": GRID, "small": SMALL_GRID, "lr": LR_GRID, "split": SPLIT_GRID}
# Candidate keys that are training settings (RoundSpec), not method options.
SPEC_KEYS = frozenset({"lr", "local_steps", "batch_size"})


def split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A chosen candidate -> (RoundSpec updates, the method's own options)."""
    spec = {k: v for k, v in options.items() if k in SPEC_KEYS}
    return spec, {k: v for k, v in options.items() if k not in SPEC_KEYS}


def resolve(options: dict[str, Any], rank: int) -> dict[str, Any]:
    """Grid shorthands to method options: `global_rank: quarter` = rank // 4 (the rest personal)."""
    out = dict(options)
    if out.get("global_rank") == "quarter":
        out["global_rank"] = max(1, rank // 4)
        out["personal_rank"] = rank - out["global_rank"]
    return out


def pretraining_text(corpus: str, held_out: set[tuple[str, str]]) -> str:
    """The Shakespeare corpus without the held-out speeches, in the corpus's own format."""
    from fedpersona.trainer.data.shakespeare import parse_blocks, user_id

    kept = [
        f"{b.speaker}:\n{b.text}\n"
        for b in parse_blocks(corpus)
        if (user_id(b.speaker), b.text) not in held_out
    ]
    return "\n".join(kept)


def build_population(args: argparse.Namespace, home: Path) -> tuple[list[str], str, dict]:
    """Write the silos; (users, text a base model may be pretrained on, data facts)."""
    if args.population == "shakespeare":
        from fedpersona.trainer.data.shakespeare import convert

        if args.corpus is None:
            raise SystemExit("--population shakespeare needs --corpus tinyshakespeare.txt")
        silos = convert(args.corpus, home / "silos", users=args.users)
        held = {(s.user, c["messages"][-1]["content"]) for s in silos for c in s.eval}
        text = pretraining_text(args.corpus.read_text(encoding="utf-8"), held)
        facts = {"corpus": str(args.corpus), "licence": "public domain (Shakespeare)"}
        return [s.user for s in silos][: args.users], text, facts
    from fedpersona.trainer.data import pydocs

    written = pydocs.write_silos(home / "silos", max_train=args.max_train)
    users = list(written)[: args.users]
    lines = []
    for user in users:
        for line in (written[user] / "train.jsonl").read_text(encoding="utf-8").splitlines():
            chat = json.loads(line)["messages"]
            lines.append(f"{chat[0]['content']}\n{chat[1]['content']}\n")
    facts = {"licence": "Python Software Foundation License Version 2", "source": "stdlib"}
    return users, "\n".join(lines), facts


def select(
    *, home: Path, work: Path, users: list[str], spec: Any, base: Path, cpus: int, grid: dict
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Best options per method by mean validation perplexity (seed 0, validation home)."""
    from fedpersona.trainer.commands.eval import compare
    from fedpersona.trainer.data.validation import carve

    val_home = work / "validation" / "home"
    carve(home / "silos", val_home / "silos", users=users)
    chosen: dict[str, dict[str, Any]] = {}
    scores: dict[str, list[dict[str, Any]]] = {}
    for method, candidates in grid.items():
        scores[method] = []
        for candidate in candidates:
            options = resolve(candidate, spec.rank)
            # Each candidate's score is kept as it finishes, under a name its options fix (grids
            # share a work folder): a later search with the same candidate reuses it.
            key = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:10]
            done = work / "validation" / f"{method}-{key}.json"
            saved = json.loads(done.read_text(encoding="utf-8")) if done.is_file() else None
            if saved is not None and saved["options"] == options:
                scores[method].append(saved)
                continue
            spec_update, method_options = split_options(options)
            result = compare(
                home=val_home,
                out=work / "validation" / f"{method}-{key}",
                methods=[method],
                users=users,
                spec=spec.model_copy(update={**spec_update, "seed": 0}),
                base_model=base,
                cpus=cpus,
                options={method: method_options},
            )
            scores[method].append({"options": options, "validation_ppl": result.mean(method)})
            done.write_text(json.dumps(scores[method][-1]), encoding="utf-8")
        best = min(scores[method], key=lambda s: s["validation_ppl"])
        chosen[method] = best["options"]
    return chosen, scores


def uplink_at_wire_dtype(
    *, base: Any, rank: int, clients: int, wire_dtype: str
) -> dict[str, float]:
    """FedAvg's uplink per round (all clients) as `ArrayRecord.count_bytes` of its packed
    upload, in float32 (the measured number, a check) and in `wire_dtype` (the fair ratio)."""
    from fedpersona.trainer.flower.packing import pack
    from fedpersona.trainer.methods import get_method
    from fedpersona.trainer.methods.base import LoraSpec

    fedavg = get_method("fedavg", spec=LoraSpec(rank=rank, alpha=2.0 * rank))
    params = fedavg.init_global(base_model=base, seed=0)
    return {
        "float32": float(clients * pack(params).count_bytes()),
        wire_dtype: float(clients * pack(params, wire_dtype=wire_dtype).count_bytes()),
    }


FIRST = ("base", "fedavg", "pftt", "perfit", "local", "fedavg-ft", "fedsa", "fedprox")


def ordered(methods: list[str]) -> list[str]:
    """The methods the targets compare first, so a run cut short has the comparisons that
    matter (the order is not a result: each method trains a fresh run of its own)."""
    return sorted(methods, key=lambda m: FIRST.index(m) if m in FIRST else len(FIRST))


def round_curve(
    *, home: Path, out: Path, comparison: Any, method: str, base_model: Path, max_len: int
) -> dict[int, float]:
    """Round -> mean held-out perplexity of the adapters served after that round, for a saved
    run; the last round's served adapters are the final ones, so it reuses their measurement."""
    from fedpersona.trainer.commands.eval import convergence

    curve = convergence(
        home=home,
        out=out,
        method=method,
        run_id=comparison.runs[method],
        users=comparison.users,
        base_model=base_model,
        max_len=max_len,
        final=comparison.mean(method),
    )
    return dict(sorted(curve.items()))


def parse_methods(text: str | None, available: tuple[str, ...]) -> list[str]:
    """`--methods a,b,c` -> the methods to measure, in the order the targets compare them
    (None: every evaluable method); an unknown name is an error naming the known ones."""
    if text is None:
        return ordered(list(available))
    asked = [m.strip() for m in text.split(",") if m.strip()]
    if unknown := [m for m in asked if m not in available]:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(available)}")
    if not asked:
        raise ValueError("--methods names no method")
    return ordered(list(dict.fromkeys(asked)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--population", choices=("shakespeare", "pydocs"), default="shakespeare")
    parser.add_argument("--corpus", type=Path, default=None, help="tinyshakespeare.txt")
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "bench-personalization")
    parser.add_argument("--users", type=int, default=8, help="users of the population")
    parser.add_argument("--max-train", type=int, default=120, help="pydocs: train chats per user")
    parser.add_argument("--seeds", type=int, default=3, help="0: the validation search alone")
    parser.add_argument("--no-select", action="store_true", help="skip the validation search")
    parser.add_argument(
        "--grid", choices=tuple(GRIDS), default="full", help="validation candidates"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run on the micro model")
    parser.add_argument(
        "--methods",
        default=None,
        help="comma list of the methods to measure (default: every evaluable method); "
        "targets that need an omitted one are reported as not run",
    )
    add_spec_arguments(
        parser.add_argument_group("training (RoundSpec)"),
        exclude={"algorithm", "users", "seed"},
        defaults=BENCHMARK_SPEC,
    )
    parser.add_argument("--recipe", choices=("micro", "tiny"), default="tiny")
    parser.add_argument("--base-model", type=Path, default=None, help="a built model dir")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--stem", default=None, help="results file name (no suffix)")
    parser.add_argument(
        "--convergence-seeds",
        type=int,
        default=None,
        help="measure the per-round curve on the first N seeds only (default: all)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="reuse the selection and finished seeds in --work"
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: report the comparisons saved in --work (implies --resume)",
    )
    parser.add_argument(
        "--add-curves",
        type=lambda text: [m for m in text.split(",") if m],
        default=[],
        help="with --resume/--report-only: measure the per-round curve of these methods' saved "
        "runs that lack one (comma list)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        given = set(sys.argv[1:] if argv is None else argv)
        for key, value in QUICK_SPEC.items():
            if f"--{key.replace('_', '-')}" not in given:
                setattr(args, key, value)
        args.recipe, args.seeds = "micro", 1
        args.users = min(args.users, 3)
        args.max_train = min(args.max_train, 12)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    log = logging.getLogger("benchmark")

    from fedpersona.trainer.commands.eval import Comparison, compare, evaluable_methods, save
    from fedpersona.trainer.flower.apps import model_info
    from fedpersona.trainer.methods import get_method
    from fedpersona.trainer.models.basemodel import RECIPES, build_models

    try:
        methods = parse_methods(args.methods, evaluable_methods())
    except ValueError as e:
        parser.error(str(e))
    started = time.monotonic()
    work = args.work / (args.population + ("-quick" if args.quick else ""))
    home = work / "home"
    users, text, facts = build_population(args, home)
    if args.base_model is not None:
        base = model_info(args.base_model.resolve())
        pretrained_on = f"given: {args.base_model}"
    else:
        base = build_models(home / "models", RECIPES[args.recipe], text, progress=False).large
        pretrained_on = "the population's text minus every held-out chat"
    log.info("base model %s ready after %.0f s", base.name, time.monotonic() - started)

    spec = spec_from_args(args, users=tuple(users))
    grid = {} if args.no_select else (QUICK_GRID if args.quick else GRIDS[args.grid])
    grid = {m: candidates for m, candidates in grid.items() if m in methods}
    selection_file = work / "selection.json"
    args.resume = args.resume or args.report_only
    if args.resume and selection_file.is_file():
        saved = json.loads(selection_file.read_text(encoding="utf-8"))
        chosen, scores = saved["chosen"], saved["validation"]
        log.info("reusing the selection of %s: %s", selection_file, chosen)
    else:
        chosen, scores = select(
            home=home, work=work, users=users, spec=spec, base=base.path, cpus=args.cpus, grid=grid
        )
        selection_file.write_text(
            json.dumps({"chosen": chosen, "validation": scores}, indent=2), encoding="utf-8"
        )
    selected_at = time.monotonic() - started
    log.info("selection done after %.0f s: %s", selected_at, chosen)
    stem = args.out / (
        args.stem or f"personalization-{args.population}{'-quick' if args.quick else ''}"
    )
    wire_dtype = str(get_method("pftt", **split_options(chosen.get("pftt", {}))[1]).wire_dtype)  # type: ignore[attr-defined]
    fedavg_at = uplink_at_wire_dtype(
        base=base, rank=spec.rank, clients=len(users), wire_dtype=wire_dtype
    )
    command = " ".join(sys.argv if argv is None else ["personalization.py", *argv])
    if args.seeds == 0:  # the validation search alone
        print(json.dumps({"chosen": chosen, "validation": scores}, indent=2))
        return 0
    runs: list[Any] = []
    for seed, method in ((s, m) for s in range(args.seeds) for m in methods):
        # One comparison per method, saved at once: a run that dies keeps every method done.
        out = work / "final" / f"seed-{seed}"
        if method == methods[0]:
            runs.append(Comparison(users=users))
        done = out / f"comparison-{method}.json"
        if (args.resume or args.report_only) and done.is_file():
            one = load_seed(done)
            log.info("seed %d: reusing %s", seed, done)
            if method in args.add_curves and not one.convergence.get(method):
                one.convergence[method] = round_curve(
                    home=home,
                    out=out,
                    comparison=one,
                    method=method,
                    base_model=base.path,
                    max_len=spec.max_len,
                )
                save(one, out, stem=done.stem)
        elif args.report_only:
            continue
        else:
            spec_update, method_options = split_options(chosen.get(method, {}))
            one = compare(
                home=home,
                out=out,
                methods=[method],
                users=users,
                spec=spec.model_copy(update={**spec_update, "seed": seed}),
                base_model=base.path,
                cpus=args.cpus,
                options={method: method_options},
                per_round=args.convergence_seeds is None or seed < args.convergence_seeds,
            )
            save(one, out, stem=done.stem)
        merge(runs[-1], one)
        log.info("seed %d, %s done after %.0f s", seed, method, time.monotonic() - started)
        result = report(
            runs,
            methods=methods,
            users=users,
            settings={
                **spec.model_dump(mode="json", exclude={"algorithm", "seed"}),
                "population": args.population,
                "seeds": list(range(len(runs))),
                "seeds_asked": args.seeds,
                "quick": args.quick,
                "base_model": base.name,
                "base_pretrained_on": pretrained_on,
                "users": users,
                "convergence_seeds": args.convergence_seeds,
                "methods": methods,
                "lr_by_method": {
                    m: split_options(chosen.get(m, {}))[0].get("lr", spec.lr) for m in methods
                },
                "command": command,
                **facts,
            },
            selection={"chosen": chosen, "validation": scores, "seconds": round(selected_at, 1)},
            fedavg_at=fedavg_at,
            wire_dtype=wire_dtype,
        )
        result["complete"] = (
            all(m in r.perplexity for r in runs for m in methods) and len(runs) == args.seeds
        )
        result["wall_seconds"] = round(time.monotonic() - started, 1)
        args.out.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        pngs = save_plots(result, users, stem)
    print_table(result, methods, users)
    print(f"saved {stem.with_suffix('.json')} and {', '.join(map(str, pngs))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
