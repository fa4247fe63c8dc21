"""`fedpersona train`: run federated rounds and publish adapters, in the foreground.

    fedpersona train --algorithm pftt --rounds 3 --users alice,bob --home DIR
    fedpersona train --algorithm fedprox --prox-mu 0.05 --rounds 3

The training flags (`--algorithm`, `--rounds`, `--users`, `--local-steps`, `--lr`, `--rank`,
`--batch-size`, `--max-len`, `--seed`, `--prox-mu`) are generated from `RoundSpec`'s fields
(`fedpersona.trainer.commands.spec_args`); the rest say where the run lives and how it runs.

Runs in Flower's Simulation Engine (one virtual SuperNode per user), or with
`--superlink HOST:PORT` on the Deployment Engine (`fedpersona.trainer.flower.deployment`), holding
the home's run
lock for the whole run, and prints the run record as a table (and as JSON with `--json`). The round
controller starts this same module as its child (`python -m fedpersona.trainer.commands.train
--run-id ...`)
after writing a queued record; that is the only use of `--run-id`.

Before Flower or Ray start, `preflight` checks what would fail the run for sure: the base model
must exist ("run `fedpersona models bootstrap`") and every user's silo must parse. A bad silo
line fails the whole run fast, before any training, listing each bad file as `file:line: what
is wrong`; the other users are not trained either (a round of a subset would silently change
who the global adapter is averaged over). Exit codes: 0 succeeded, 2 input error (nothing ran),
1 the run failed.

A run shows one progress bar (rounds done, from the run record) on a terminal and one summary
table at the end; the libraries' own output (Flower's INFO lines, which it would print twice,
Ray's, alembic's plugin lines, deprecation and tokenizer warnings) stays behind `-v`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from fedpersona.adapters import MAX_LORA_RANK
from fedpersona.adapters import home as adapters_home
from fedpersona.adapters.home import Home
from fedpersona.trainer.commands.spec_args import add_spec_arguments, spec_from_args
from fedpersona.trainer.data.validation import check_silos
from fedpersona.trainer.errors import DataError, TrainerError
from fedpersona.trainer.flower.runconfig import config_of
from fedpersona.trainer.methods import behaviour_of
from fedpersona.trainer.rounds.lock import RunLock, resolve_users
from fedpersona.trainer.rounds.records import RunRecords, RunState, RunStatus, utcnow

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", type=Path, default=None, help="fedpersona home (FEDPERSONA_HOME)")
    add_spec_arguments(parser.add_argument_group("training (RoundSpec)"))
    parser.add_argument(
        "--base-model",
        type=Path,
        default=None,
        help="default <home>/models/<role>: large, or small for a method that tunes proxy experts",
    )
    parser.add_argument("--store", type=Path, default=None, help="default <home>/store")
    parser.add_argument("--runs-dir", type=Path, default=None, help="default <home>/runs")
    parser.add_argument(
        "--max-rank",
        type=int,
        default=MAX_LORA_RANK,
        help="the store's (= vLLM's --max-lora-rank) max rank (default: %(default)s)",
    )
    parser.add_argument("--cpus", type=int, default=None, help="ClientApps training at once")
    parser.add_argument("--no-resume", action="store_true", help="start from a fresh global")
    parser.add_argument(
        "--superlink",
        default=None,
        metavar="HOST:PORT",
        help="run on the Deployment Engine: submit to this SuperLink Control API with `flwr run` "
        "(its SuperNodes name their users and silos); default: the Simulation Engine",
    )
    parser.add_argument(
        "--root-certificates",
        type=Path,
        default=None,
        help="with --superlink: the CA file of a TLS SuperLink (default: plain gRPC)",
    )
    parser.add_argument(
        "--node-bindings",
        type=Path,
        default=None,
        help="with --superlink: the node -> users bindings (`fedpersona nodes register`)",
    )
    parser.add_argument("--run-id", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print the run record as JSON")


def quiet_libraries(verbose: bool) -> None:
    """Keep the libraries' chatter behind `-v`; set before Flower, Ray and transformers load
    (the environment reaches the Ray workers that run the ClientApps)."""
    # Flower's logger has its own console handler: propagating too would print each line twice.
    logging.getLogger("flwr").propagate = False
    if verbose:
        return
    os.environ.setdefault("FLWR_LOG_LEVEL", "ERROR")  # its deprecation and actor-stop notes
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::FutureWarning")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    for name in ("alembic", "ray", "filelock", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


@contextlib.contextmanager
def round_progress(records: RunRecords, run_id: str, *, rounds: int) -> Iterator[None]:
    """A progress bar of the rounds done (read from the run record) while the block runs;
    nothing when stderr is not a terminal."""
    if not sys.stderr.isatty():
        yield
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    done = threading.Event()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    console = Console(stderr=True)  # stdout is for the results (the table, --json)
    with Progress(*columns, TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task(f"run {run_id}: rounds", total=rounds)

        def poll() -> None:
            while not done.wait(1.0):
                with contextlib.suppress(TrainerError, ValueError, OSError):
                    status = records.read(run_id)
                    loss = status.rounds[-1].train_loss if status.rounds else None
                    suffix = "" if loss is None else f" (loss {loss:.3f})"
                    progress.update(
                        task,
                        completed=len(status.rounds),
                        description=f"run {run_id}: rounds{suffix}",
                    )

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        try:
            yield
        finally:
            done.set()
            poller.join(5)


def resolve_home(home: Path | None) -> Path:
    return adapters_home.resolve_home(home).resolve()


def run(args: argparse.Namespace) -> int:
    home = resolve_home(args.home)
    runs_dir = (args.runs_dir or home / "runs").resolve()
    records = RunRecords(runs_dir)
    try:
        if args.run_id:
            status = records.read(args.run_id)
            spec, users = status.spec, status.users
        else:
            spec = spec_from_args(args)
            if args.superlink:  # the silos live on the SuperNodes, not under this home
                if not spec.users:
                    raise ValueError("--superlink needs --users (the users the SuperNodes serve)")
                users = list(spec.users)
            else:
                users = resolve_users(home, spec.users)
            status = None
        preflight(
            home,
            algorithm=spec.algorithm,
            users=users,
            base_model=args.base_model,
            silos=not args.superlink,
        )
        with RunLock(runs_dir):
            if status is None:
                status = records.create(spec, users=users)
            config = config_of(
                spec,
                run_id=status.id,
                home=home,
                users=tuple(users),
                store=args.store,
                base_model=args.base_model,
                runs_dir=runs_dir,
                max_rank=args.max_rank,
                resume=not args.no_resume,
                node_bindings=args.node_bindings.resolve() if args.node_bindings else None,
            )
            if args.superlink:
                from fedpersona.trainer.flower.deployment import submit

                final = submit(
                    config,
                    control=args.superlink,
                    flwr_home=home / "flwr",
                    log_file=runs_dir / f"{status.id}.flwr.log",
                    root_certificates=args.root_certificates,
                )
            else:
                # Imports Flower and Ray: only once the run is known to be able to start.
                quiet_libraries(getattr(args, "verbose", False))
                from fedpersona.trainer.flower.simulation import simulate

                with round_progress(records, status.id, rounds=spec.rounds):
                    final = simulate(config, cpus=args.cpus)
    except (TrainerError, ValueError) as e:
        if args.run_id:
            _mark_failed(records, args.run_id, e)
        log.error("%s", e)
        return 2
    _report(final, as_json=args.json)
    return 0 if final.state == RunState.succeeded else 1


def preflight(
    home: Path, *, algorithm: str, users: Sequence[str], base_model: Path | None, silos: bool
) -> None:
    """Raise `DataError` for what would fail the run for sure (no Flower, no Ray, no model
    loaded): a missing base model, or any bad silo line (all of them, one per line)."""
    layout = Home(home)
    model = base_model or layout.model(behaviour_of(algorithm).base_role.value)
    if not (Path(model) / "config.json").is_file():
        raise DataError(
            f"no base model at {model}: run `fedpersona models bootstrap` first "
            "(or pass --base-model DIR)"
        )
    if silos:
        problems = check_silos({user: layout.silo(user) for user in users})
        if problems:
            raise DataError(
                f"{len(problems)} bad silo file(s); nothing was trained:\n" + "\n".join(problems)
            )


def _mark_failed(records: RunRecords, run_id: str, error: Exception) -> None:
    with contextlib.suppress(TrainerError):
        records.update(
            run_id,
            state=RunState.failed,
            finished_at=utcnow(),
            error=f"{type(error).__name__}: {error}",
        )


def _report(status: RunStatus, *, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(json.loads(status.model_dump_json()), indent=2) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"run {status.id}: {status.spec.algorithm}, {status.state.value}")
    for column in ("round", "train loss", "uplink bytes", "downlink bytes", "wall s", "global"):
        table.add_column(column, justify="right")
    for r in status.rounds:
        table.add_row(
            str(r.round),
            "-" if r.train_loss is None else f"{r.train_loss:.4f}",
            f"{r.bytes_up:,}",
            f"{r.bytes_down:,}",
            f"{r.wall_s:.1f}",
            r.global_version or "-",
        )
    console = Console()
    console.print(table)
    if status.error:
        console.print(f"[red]error:[/red] {status.error}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedpersona.trainer.commands.train", description=__doc__
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
