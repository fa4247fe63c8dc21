"""The Flower ServerApp and ClientApp of fedpersona, built from the `Method` protocol.

The same two apps run in Flower's Simulation Engine (`trainer/flower/simulation.py`, the embedded
default) and on the Deployment Engine (`flwr run trainer/flower/flwr_app`, SuperLink + SuperNodes):

- `server_app` (module level, for the Deployment Engine) reads `context.run_config`;
  `build_server_app(...)` makes one with extra hooks (a method factory, a message observer) for
  in-process runs and tests.
- `client_app` reads the run config plus its SuperNode's node config (`user`, `silo`, optionally
  `store`/`base-model`; in simulation `partition-id` picks the user). A client trains with
  `Method.client_update`, keeps its state in `context.state` and in its silo (so it survives
  rounds and runs), publishes its personal LoRA to its private store slot itself, and replies
  with the upload only. Personal tensors never enter a Flower message. Under secure aggregation
  (`secure-aggregation`) it also answers the key, share and unmask queries and replies with its
  update masked (`fedpersona.trainer.flower.secagg`), never the upload itself.

Training and aggregation live in `fedpersona.trainer.methods`; publishing in
`fedpersona.trainer.rounds.publish`; the round
loop and accounting in `fedpersona.trainer.flower.strategy`; run records in
`fedpersona.trainer.rounds.records`.
"""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path

import numpy as np
from fedpersona.adapters import AdapterStore
from fedpersona.adapters.preferences import effective_preferences
from fedpersona.trainer.errors import RoundFailed
from fedpersona.trainer.flower.admission import Admission
from fedpersona.trainer.flower.client_state import (
    ClientState,
    binding_of,
    load_params,
    save_params,
)
from fedpersona.trainer.flower.identity import NodeBindings
from fedpersona.trainer.flower.runconfig import NodeIdentity, RunConfig, Scalar, spec_of
from fedpersona.trainer.flower.secagg import KEYS, SHARES, UNMASK, answer, masked_upload
from fedpersona.trainer.flower.secagg_server import SecAggServer
from fedpersona.trainer.flower.strategy import (
    CLIENT_KEY,
    CONFIG_KEY,
    GLOBAL_KEY,
    METRICS_KEY,
    NUM_EXAMPLES,
    TRAIN_LOSS,
    UPLOAD_KEY,
    MessageObserver,
    MethodStrategy,
    from_record,
    to_record,
)
from fedpersona.trainer.methods.base import Method, Params, TrainConfig
from fedpersona.trainer.methods.robust import AggregationRule
from fedpersona.trainer.models.basemodel import ModelInfo, read_marker
from fedpersona.trainer.privacy import spent
from fedpersona.trainer.rounds.publish import RoundPublisher, publish_personal
from fedpersona.trainer.rounds.records import (
    RoundRecord,
    RoundSpec,
    RunNotFound,
    RunRecords,
    RunState,
    utcnow,
)
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

log = logging.getLogger(__name__)

MethodFactory = Callable[[RunConfig], Method]


def model_info(path: Path) -> ModelInfo:
    """The `ModelInfo` of a built model directory (its `fedpersona.json` names it)."""
    marker = read_marker(path)
    if marker is None or not marker.get("name"):
        raise FileNotFoundError(f"{path}: not a fedpersona model directory (no fedpersona.json)")
    return ModelInfo(
        path=Path(path),
        name=str(marker["name"]),
        role=str(marker.get("role", "large")),
        recipe_hash=str(marker.get("recipe_hash", "")),
        num_parameters=int(str(marker.get("num_parameters", 0))),
    )


def default_method(config: RunConfig) -> Method:
    """The method a run config names, with its LoRA rank (alpha = 2 * rank)."""
    return _cached_method(config.spec.algorithm, config.spec.rank)


@lru_cache(maxsize=4)
def _cached_method(algorithm: str, rank: int) -> Method:
    from fedpersona.trainer.methods import LoraSpec, get_method

    return get_method(algorithm, spec=LoraSpec(rank=rank, alpha=2.0 * rank))


def train_config(
    config: RunConfig, *, round_idx: int, user: str, reward_mix: float | None = None
) -> TrainConfig:
    # A different, reproducible seed per user and round.
    spec = config.spec
    seed = int(np.random.SeedSequence([spec.seed, round_idx, *user.encode()]).generate_state(1)[0])
    return TrainConfig(
        steps=spec.local_steps,
        lr=spec.lr,
        batch_size=spec.batch_size,
        max_len=spec.max_len,
        seed=seed % (2**31),
        prox_mu=spec.prox_mu,
        total_rounds=spec.rounds,
        reward_mix=reward_mix,
    )


# ------------------------------------------------------------------------------- server


def run_server(
    grid: Grid,
    context: Context,
    *,
    method_factory: MethodFactory = default_method,
    observer: MessageObserver | None = None,
    run_config: Mapping[str, Scalar] | None = None,
) -> None:
    """The ServerApp's main: run `rounds` rounds, publishing and recording each one.

    `run_config` gives defaults under `context.run_config` (the Simulation Engine's
    `run_simulation` passes no run config of its own).
    """
    config = RunConfig.from_flower({**(run_config or {}), **context.run_config})
    journal = RunJournal(RunRecords(config.runs_dir), config)
    journal.start()
    try:
        method = method_factory(config)
        base = model_info(config.base_model)
        store = AdapterStore(config.store, max_rank=config.max_rank)
        checkpoint = Checkpoint(config.runs_dir / "checkpoints" / f"{config.spec.algorithm}.npz")
        initial = method.init_global(base_model=base, seed=config.spec.seed)
        if config.resume:
            initial = checkpoint.load(like=initial) or initial
        spec = config.spec
        bindings = NodeBindings.load(config.node_bindings) if config.node_bindings else None
        rule = AggregationRule(
            name=spec.aggregation,
            trim_fraction=spec.trim_fraction,
            byzantine=spec.byzantine,
            clip_norm=spec.clip_norm,
            dp_noise=spec.dp_noise,
        )
        publisher = RoundPublisher(
            store=store,
            method=method,
            base_model=base,
            algorithm=config.spec.algorithm,
            run_id=config.run_id,
            staging_root=config.runs_dir / "staging" / config.run_id,
            on_published=lambda _round, params: checkpoint.save(params),
            privacy=(lambda done: privacy_of(spec, done)) if spec.dp_noise > 0 else None,
        )
        admission = Admission(
            bindings=bindings.as_mapping() if bindings is not None else None,
            round_users=frozenset(config.users) or None,
            max_examples=spec.max_examples,
        )
        strategy = MethodStrategy(
            method=method,
            initial=initial,
            publisher=publisher,
            on_round=journal.add_round,
            min_nodes=config.expected_nodes,
            observer=observer,
            admission=admission,
            rule=rule,
            epsilon_at=(
                (lambda done: float(privacy_of(spec, done)["epsilon"]))
                if spec.dp_noise > 0
                else None
            ),
            seed=spec.seed,
            secagg=(
                SecAggServer(
                    admission=admission,
                    clipping_range=spec.secagg_range,
                    timeout=config.round_timeout,
                    observer=observer,
                )
                if spec.secure_aggregation
                else None
            ),
        )
        strategy.start(
            grid=grid,
            initial_arrays=to_record(initial),
            num_rounds=config.spec.rounds,
            timeout=config.round_timeout,
        )
    except Exception as e:
        journal.fail(e)
        raise
    journal.succeed()


def privacy_of(spec: RoundSpec, rounds_done: int) -> dict[str, float]:
    """What a published adapter records about the central DP of the rounds behind it."""
    budget = spent(noise_multiplier=spec.dp_noise, rounds=rounds_done, delta=spec.dp_delta)
    return {
        "epsilon": round(budget.epsilon, 4),
        "delta": spec.dp_delta,
        "noise_multiplier": spec.dp_noise,
        "clip_norm": spec.clip_norm,
        "rounds": rounds_done,
    }


def build_server_app(
    *,
    method_factory: MethodFactory = default_method,
    observer: MessageObserver | None = None,
    run_config: Mapping[str, Scalar] | None = None,
) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(
            grid, context, method_factory=method_factory, observer=observer, run_config=run_config
        )

    return app


# ------------------------------------------------------------------------------- client


def run_client(
    message: Message,
    context: Context,
    *,
    method_factory: MethodFactory = default_method,
    run_config: Mapping[str, Scalar] | None = None,
) -> Message:
    """One local round on this node's silo; reply with the method's upload only."""
    config = RunConfig.from_flower({**(run_config or {}), **context.run_config})
    node = NodeIdentity.from_flower(context.node_config, config)
    method = method_factory(config)
    base = model_info(node.base_model)
    round_idx = int(message.content.config_records[CONFIG_KEY]["server-round"])  # type: ignore[arg-type]
    global_params = from_record(message.content.array_records[GLOBAL_KEY])

    states = ClientState(
        context,
        node.silo,
        config.spec.algorithm,
        binding=binding_of(method, base),
        resume=config.resume,
    )
    # The user's reward mix as the operator set it last (read each round, so a change applies
    # from the next round on).
    reward_mix = (
        effective_preferences(node.store, node.user).reward_mix
        if method.behaviour.rewards
        else None
    )
    update = method.client_update(
        base_model=base,
        silo=node.silo,
        global_params=global_params,
        state=states.load(),
        config=train_config(config, round_idx=round_idx, user=node.user, reward_mix=reward_mix),
        round_idx=round_idx,
    )
    states.save(update.state)
    store = AdapterStore(node.store, max_rank=config.max_rank)
    personal_version = publish_personal(
        store, method, user=node.user, base_model=base, state=update.state
    )
    num_examples = int(update.num_examples)
    if not config.spec.secure_aggregation:
        # A method may ship its upload in a compact dtype (PFTT: `wire_dtype`).
        upload = to_record(update.upload, wire_dtype=getattr(method, "wire_dtype", "float32"))
    else:
        num_examples = min(num_examples, config.spec.max_examples)  # the weight it masks with
        upload = masked_upload(
            message,
            context,
            global_params=global_params,
            upload=update.upload,
            weight=num_examples,
            clip=config.spec.secagg_range,
        )
    metrics = MetricRecord({NUM_EXAMPLES: num_examples})
    for key, value in update.metrics.items():
        metrics[key.replace("_", "-")] = float(value)
    if "train_loss" in update.metrics:
        metrics[TRAIN_LOSS] = float(update.metrics["train_loss"])
    content = RecordDict(
        {
            UPLOAD_KEY: upload,
            METRICS_KEY: metrics,
            CLIENT_KEY: ConfigRecord(
                {"user": node.user, "personal-version": personal_version or ""}
            ),
        }
    )
    return Message(content=content, reply_to=message)


def build_client_app(
    *,
    method_factory: MethodFactory = default_method,
    run_config: Mapping[str, Scalar] | None = None,
) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return run_client(message, context, method_factory=method_factory, run_config=run_config)

    def secagg(action: str) -> Callable[[Message, Context], Message]:
        def reply(message: Message, context: Context) -> Message:
            config = RunConfig.from_flower({**(run_config or {}), **context.run_config})
            if not config.spec.secure_aggregation:
                raise RoundFailed("a secure-aggregation query in a run without it")
            user = NodeIdentity.from_flower(context.node_config, config).user
            return answer(message, context, action, user=user)

        return reply

    for action in (KEYS, SHARES, UNMASK):  # the extra stages of a secure round
        app.query(action)(secagg(action))

    return app


# ------------------------------------------------------------------------ state and records


class Checkpoint:
    """The last published global params of an algorithm, so a new run continues from them."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self, *, like: Params) -> Params | None:
        if not self.path.is_file():
            return None
        loaded = load_params(self.path)
        same = set(loaded) == set(like) and all(loaded[k].shape == like[k].shape for k in like)
        if not same:
            log.warning(
                "%s does not match this run's global (rank changed?); starting fresh", self.path
            )
            return None
        log.info("continuing from %s", self.path)
        return loaded

    def save(self, params: Params) -> None:
        save_params(self.path, params)


class RunJournal:
    """Writes one run's record as it progresses (`fedpersona.trainer.rounds.records`), from the
    ServerApp."""

    def __init__(self, records: RunRecords, config: RunConfig) -> None:
        self.records = records
        self.config = config
        self.run_id = config.run_id

    def start(self) -> None:
        try:
            self.records.read(self.run_id)
        except RunNotFound:  # started by `flwr run` directly, not by the controller or the CLI
            self.records.create(
                spec_of(self.config), users=list(self.config.users), run_id=self.run_id
            )
        self.records.update(
            self.run_id, state=RunState.running, started_at=utcnow(), pid=os.getpid()
        )

    def add_round(self, record: RoundRecord) -> None:
        status = self.records.read(self.run_id)
        rounds = [*status.rounds, record]
        self.records.update(
            self.run_id, rounds=rounds, progress=round(len(rounds) / status.spec.rounds, 4)
        )
        log.info(
            "round %d done in %.1f s: loss %s, %d bytes up, %d bytes down",
            record.round,
            record.wall_s,
            record.train_loss,
            record.bytes_up,
            record.bytes_down,
        )

    def succeed(self) -> None:
        self.records.update(self.run_id, state=RunState.succeeded, finished_at=utcnow())

    def fail(self, error: BaseException) -> None:
        log.error("run %s failed: %s", self.run_id, "".join(traceback.format_exception(error)))
        self.records.update(
            self.run_id,
            state=RunState.failed,
            finished_at=utcnow(),
            error=f"{type(error).__name__}: {error}",
        )


server_app = build_server_app()
client_app = build_client_app()
