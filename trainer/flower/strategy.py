"""`MethodStrategy`: a Flower strategy whose aggregation is a `Method`'s and that publishes rounds.

Flower's `Strategy.start` drives the loop (send the global, wait for replies, aggregate, repeat);
this class fills in each step from the `Method` protocol:

- `configure_train` sends every connected SuperNode the current global params (ArrayRecord
  "global") and the round number, and notes the serialized bytes each node receives.
- `aggregate_train` refuses a round with failed clients (nothing of it gets published), reads
  each reply's upload, example count, loss and user, drops the replies `Admission` refuses (a
  node speaking for a user it is not bound to, a user outside the round, a malformed reply) and
  caps example counts, aggregates with the run's `AggregationRule` around `Method.aggregate`
  (both pure), then hands the new global and the admitted participants to the publisher, and
  only then records the round (with the refusals and, under DP, the run's epsilon so far).
- With `secagg` (`fedpersona.trainer.flower.secagg_server`), `configure_train` first runs the
  key and share exchange (bindings checked on the key replies, before any mask), the train messages
  carry each node's encrypted shares, replies carry masked uploads, and `aggregate_train`
  unmasks only their weighted mean: the new global is the previous one plus that mean delta.

The strategy keeps the global params of the run in memory (they are the server's model); all
per-user state lives on the clients (`context.state` and their silos). It knows nothing about
how a method trains or what its params mean.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from fedpersona.trainer.errors import ReplyRefused, RoundFailed
from fedpersona.trainer.flower.admission import Admission
from fedpersona.trainer.flower.packing import pack, unpack
from fedpersona.trainer.flower.secagg import SECAGG_KEY
from fedpersona.trainer.flower.secagg_server import SecAggServer, Session, check_masked
from fedpersona.trainer.methods.base import Method, Params
from fedpersona.trainer.methods.robust import AggregationRule
from fedpersona.trainer.rounds.records import ClientRound, RoundRecord
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

log = logging.getLogger(__name__)

# Record keys of the messages between the ServerApp and the ClientApp.
GLOBAL_KEY = "global"  # ArrayRecord, server -> client: the current global params
CONFIG_KEY = "config"  # ConfigRecord, server -> client: {"server-round": n}
UPLOAD_KEY = "upload"  # ArrayRecord, client -> server: what the method shares
METRICS_KEY = "metrics"  # MetricRecord, client -> server: num-examples, train-loss, ...
CLIENT_KEY = "client"  # ConfigRecord, client -> server: user, personal-version
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"


def to_record(params: Params, *, wire_dtype: str = "float32") -> ArrayRecord:
    """`params` in one packed array (`fedpersona.trainer.flower.packing`): no per-key overhead;
    floating arrays shipped in `wire_dtype`."""
    return pack(params, wire_dtype=wire_dtype)


def from_record(record: ArrayRecord) -> Params:
    return unpack(record)


def payload_bytes(content: RecordDict) -> int:
    """The serialized array bytes a message carries (what the round's accounting counts)."""
    return sum(record.count_bytes() for record in content.array_records.values())


@dataclass(frozen=True)
class Participant:
    """One client's reply, as the publisher needs it."""

    user: str
    node_id: int
    num_examples: int
    personal_version: str | None
    upload: Params
    metrics: dict[str, float]


@dataclass(frozen=True)
class Published:
    global_version: str | None
    served_versions: dict[str, str]


Publisher = Callable[[int, Params, list[Participant]], Published]
RoundSink = Callable[[RoundRecord], None]
MessageObserver = Callable[[str, Message], None]
EpsilonAt = Callable[[int], float | None]  # rounds done -> the run's epsilon (None: no DP)


@dataclass
class _RoundBook:
    started: float = 0.0
    bytes_down: dict[int, int] = field(default_factory=dict)
    grid: Grid | None = None
    session: Session | None = None  # secure aggregation: this round's key exchange


class MethodStrategy(Strategy):
    """Send the global, aggregate with `method.aggregate`, publish, record. All nodes train."""

    def __init__(
        self,
        *,
        method: Method,
        initial: Params,
        publisher: Publisher,
        on_round: RoundSink,
        min_nodes: int,
        observer: MessageObserver | None = None,
        admission: Admission | None = None,
        rule: AggregationRule | None = None,
        epsilon_at: EpsilonAt | None = None,
        seed: int = 0,
        secagg: SecAggServer | None = None,
    ) -> None:
        self.method = method
        self.current: Params = dict(initial)
        self.publisher = publisher
        self.on_round = on_round
        self.min_nodes = max(1, min_nodes)
        self.observer = observer
        self.admission = admission or Admission()
        self.rule = rule or AggregationRule()
        self.epsilon_at = epsilon_at
        self.rng = np.random.default_rng(seed)
        self.secagg = secagg
        self._book = _RoundBook()

    def summary(self) -> None:
        log.info(
            "MethodStrategy: method=%s, waiting for %d nodes", self.method.name, self.min_nodes
        )

    # ------------------------------------------------------------------------------ train

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._book = _RoundBook(started=time.monotonic(), grid=grid)
        nodes = self._wait_for_nodes(grid)
        if self.secagg is not None:
            self._book.session = self.secagg.setup(grid, nodes)
            nodes = self._book.session.nodes
        messages = []
        for node_id in nodes:
            content = RecordDict(
                {
                    GLOBAL_KEY: arrays,
                    CONFIG_KEY: ConfigRecord({**config, "server-round": server_round}),
                }
            )
            if self._book.session is not None:
                content[SECAGG_KEY] = self._book.session.train_record(node_id)
            message = Message(content=content, dst_node_id=node_id, message_type=MessageType.TRAIN)
            self._book.bytes_down[node_id] = payload_bytes(content)
            self._observe("down", message)
            messages.append(message)
        log.info("round %d: sending the global to %d nodes", server_round, len(messages))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for reply in replies:
            self._observe("up", reply)
        failed = [r for r in replies if r.has_error()]
        if failed:
            reasons = "; ".join(f"node {r.metadata.src_node_id}: {r.error.reason}" for r in failed)
            raise RoundFailed(f"round {server_round}: {len(failed)} client(s) failed: {reasons}")
        missing = set(self._book.bytes_down) - {r.metadata.src_node_id for r in replies}
        if missing or not replies:
            raise RoundFailed(
                f"round {server_round}: no reply from {len(missing) or 'any'} node(s) in time"
            )

        admitted: list[tuple[Participant, Message]] = []
        session = self._book.session
        refused: list[str] = list(session.refused) if session is not None else []
        for reply in replies:
            try:
                participant = self._participant(reply)
                if session is not None:
                    check_masked(session, participant.node_id, participant.user, participant.upload)
                admitted.append((participant, reply))
            except ReplyRefused as e:
                log.warning("round %d: reply refused: %s", server_round, e)
                refused.append(str(e))
        if not admitted:
            raise RoundFailed(f"round {server_round}: every reply was refused: {refused}")
        participants = [p for p, _ in admitted]
        users = [p.user for p in participants]
        if len(set(users)) != len(users):
            raise RoundFailed(f"round {server_round}: two nodes claim the same user: {users}")
        if session is not None and any(p.upload for p in participants):
            new_global = self._unmasked(session, participants)
            # The publisher gets no upload: the server holds only masked vectors.
            participants = [dataclasses.replace(p, upload={}) for p in participants]
        else:
            new_global = self.rule.aggregate(
                self.method,
                previous=self.current,
                results=[(p.upload, p.num_examples) for p in participants],
                rng=self.rng,
            )
        published = self.publisher(server_round, new_global, participants)
        self.current = new_global

        extra_up = session.bytes_up if session is not None else {}
        extra_down = session.bytes_down if session is not None else {}
        clients = [
            ClientRound(
                user=p.user,
                num_examples=p.num_examples,
                bytes_up=payload_bytes(r.content) + extra_up.get(p.node_id, 0),
                bytes_down=self._book.bytes_down[p.node_id] + extra_down.get(p.node_id, 0),
                train_loss=p.metrics.get(TRAIN_LOSS),
                metrics={k: v for k, v in p.metrics.items() if np.isfinite(v)},
            )
            for p, r in admitted
        ]
        loss = _weighted_loss(clients)
        record = RoundRecord(
            round=server_round,
            wall_s=round(time.monotonic() - self._book.started, 3),
            train_loss=loss,
            bytes_up=sum(c.bytes_up for c in clients),
            bytes_down=sum(c.bytes_down for c in clients),
            clients=sorted(clients, key=lambda c: c.user),
            global_version=published.global_version,
            served_versions=published.served_versions,
            refused=refused,
            epsilon=self.epsilon_at(server_round) if self.epsilon_at else None,
            secure_aggregation=(
                {
                    "wall-s": round(session.wall_s, 3),
                    "bytes-up": sum(session.bytes_up.values()),
                    "bytes-down": sum(session.bytes_down.values()),
                }
                if session is not None
                else None
            ),
        )
        self.on_round(record)
        metrics = MetricRecord({"bytes-up": record.bytes_up, "bytes-down": record.bytes_down})
        if loss is not None:
            metrics[TRAIN_LOSS] = loss
        return to_record(new_global), metrics

    # --------------------------------------------------------------------------- evaluate

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []  # held-out evaluation is `fedpersona eval`'s job, on the published adapters

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return None

    # ---------------------------------------------------------------------------- helpers

    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        while len(nodes := self.admission.eligible(grid.get_node_ids())) < self.min_nodes:
            log.info("waiting for nodes: %d of %d connected", len(nodes), self.min_nodes)
            time.sleep(1.0)
        return nodes

    def _unmasked(self, session: Session, participants: list[Participant]) -> Params:
        """Secure aggregation: the previous global plus the unmasked weighted mean delta."""
        if not all(p.upload for p in participants):
            raise RoundFailed("secure aggregation: some clients uploaded nothing, others did")
        assert self.secagg is not None and self._book.grid is not None
        masked = {p.node_id: (p.upload, p.num_examples) for p in participants}
        delta = self.secagg.unmask(self._book.grid, session, masked)
        if set(delta) != set(self.current) or any(
            delta[k].shape != self.current[k].shape for k in delta
        ):
            raise RoundFailed("secure aggregation: the masked upload is not shaped like the global")
        return {k: (self.current[k] + delta[k]).astype(np.float32) for k in self.current}

    def _participant(self, reply: Message) -> Participant:
        content = reply.content
        node = reply.metadata.src_node_id
        try:
            client = content.config_records[CLIENT_KEY]
            metrics = content.metric_records[METRICS_KEY]
            upload = from_record(content.array_records[UPLOAD_KEY])
            claimed = metrics[NUM_EXAMPLES]
            user = str(client["user"])
        except (KeyError, TypeError, ValueError) as e:
            raise ReplyRefused(f"node {node} sent a malformed reply: {e!r}") from e
        num_examples = self.admission.admit(node_id=node, user=user, num_examples=claimed)
        version = str(client.get("personal-version", "") or "") or None
        return Participant(
            user=user,
            node_id=node,
            num_examples=num_examples,
            personal_version=version,
            upload=upload,
            metrics={k: float(v) for k, v in metrics.items() if isinstance(v, int | float)},
        )

    def _observe(self, direction: str, message: Message) -> None:
        if self.observer is not None:
            self.observer(direction, message)


def _weighted_loss(clients: list[ClientRound]) -> float | None:
    pairs = [(c.train_loss, c.num_examples) for c in clients if c.train_loss is not None]
    if not pairs:
        return None
    total = sum(n for _, n in pairs)
    return float(sum(loss * n for loss, n in pairs) / total)


def _last_line(reason: str, limit: int = 300) -> str:
    """The gist of a client's error (Flower sends the whole remote traceback)."""
    lines = [line.strip() for line in str(reason).splitlines() if line.strip()]
    gist = next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "")
    return gist[-limit:]
