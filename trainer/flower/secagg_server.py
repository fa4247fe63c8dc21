"""The server's side of secure aggregation: the extra stages of one round over the `Grid`.

`SecAggServer.setup` runs the key exchange (checking every node's user claim against the node
bindings with `Admission.admit`, on the authenticated `src_node_id`, before any mask exists) and
the share exchange, and returns a `Session`: the participants, their mask public keys and the
encrypted shares each train message carries. `SecAggServer.unmask` asks the survivors for the
shares it may have and returns the weighted mean delta of the masked uploads
(`fedpersona.trainer.flower.secagg.unmask_mean`). `check_masked` refuses a train reply that is not
from a participant, names another user than at key exchange, or is not masked; such a node counts
as dropped. The server never holds a node's private key or seed except a dropped node's mask key
(rebuilt to remove its pairwise masks). Used by `MethodStrategy`; knows nothing about methods.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from fedpersona.trainer.errors import ReplyRefused, RoundFailed
from fedpersona.trainer.flower.admission import Admission
from fedpersona.trainer.flower.secagg import (
    KEYS,
    SECAGG_KEY,
    SHARES,
    UNMASK,
    Params,
    blob,
    blobs,
    ids_of,
    ids_text,
    threshold_of,
    unmask_mean,
)
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

log = logging.getLogger(__name__)

Observer = Callable[[str, Message], None]


@dataclass
class Session:
    """One round's key exchange as the server holds it (no secret of any node)."""

    users: dict[int, str]  # participant node -> the user it claimed at key exchange
    pk1: dict[int, bytes]
    threshold: int
    cipher_to: dict[int, dict[int, bytes]]  # dst -> src -> ciphertext
    refused: list[str] = field(default_factory=list)
    bytes_up: dict[int, int] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def nodes(self) -> list[int]:
        return sorted(self.users)

    def train_record(self, node: int) -> ConfigRecord:
        sources = self.cipher_to.get(node, {})
        return ConfigRecord({"src": ids_text(sources), "ct": list(sources.values())})


def _value_bytes(value: object) -> int:
    if isinstance(value, list):
        return sum(_value_bytes(v) for v in value)
    return len(value) if isinstance(value, str | bytes) else 8


def _size(content: RecordDict) -> int:
    """The bytes a stage message carries: values (str/bytes by length, numbers as 8) and keys,
    as Flower's `count_bytes` counts them (which fails on empty strings and lists)."""
    configs = sum(
        len(k) + _value_bytes(v) for r in content.config_records.values() for k, v in r.items()
    )
    return configs + sum(r.count_bytes() for r in content.array_records.values())


@dataclass
class SecAggServer:
    """Drives the extra stages over the `Grid` for `MethodStrategy`."""

    admission: Admission
    clipping_range: float
    timeout: float | None = None
    observer: Observer | None = None

    def _exchange(
        self, grid: Grid, action: str, records: Mapping[int, ConfigRecord], session: Session | None
    ) -> dict[int, ConfigRecord]:
        messages = []
        for node, record in records.items():
            content = RecordDict({SECAGG_KEY: record})
            messages.append(
                Message(content=content, dst_node_id=node, message_type=f"query.{action}")
            )
            if session is not None:
                session.bytes_down[node] = session.bytes_down.get(node, 0) + _size(content)
            self._observe("down", messages[-1])
        replies: dict[int, ConfigRecord] = {}
        for reply in grid.send_and_receive(messages, timeout=self.timeout):
            self._observe("up", reply)
            node = reply.metadata.src_node_id
            if reply.has_error() or SECAGG_KEY not in reply.content.config_records:
                reason = reply.error.reason if reply.has_error() else "no secagg record"
                log.warning("secure aggregation %s: node %d failed: %s", action, node, reason)
                continue
            replies[node] = reply.content.config_records[SECAGG_KEY]
            if session is not None:
                session.bytes_up[node] = session.bytes_up.get(node, 0) + _size(reply.content)
        return replies

    def setup(self, grid: Grid, nodes: list[int]) -> Session:
        """Stages 1-2; the bindings are checked on the key replies, before any masking."""
        started = time.monotonic()
        session = Session(users={}, pk1={}, threshold=0, cipher_to={})
        replies = self._exchange(grid, KEYS, {n: ConfigRecord({}) for n in nodes}, session)
        pk2: dict[int, bytes] = {}
        for node, reply in replies.items():
            try:
                user = str(reply["user"])
                self.admission.admit(node_id=node, user=user, num_examples=1)
                session.pk1[node], pk2[node] = blob(reply, "pk1"), blob(reply, "pk2")
            except (KeyError, ReplyRefused, RoundFailed) as e:
                session.refused.append(f"key exchange: {e}")
                continue
            session.users[node] = user
        if len(set(session.users.values())) != len(session.users):
            raise RoundFailed(f"two nodes claim the same user: {sorted(session.users.values())}")
        self._need(session, len(session.users), "key exchange")
        session.threshold = threshold_of(len(session.users))
        ids = session.nodes
        request = ConfigRecord(
            {
                "nodes": ids_text(ids),
                "pk1": [session.pk1[n] for n in ids],
                "pk2": [pk2[n] for n in ids],
                "threshold": session.threshold,
            }
        )
        shared = self._exchange(grid, SHARES, {n: request for n in ids}, session)
        for node in ids:
            if node not in shared:
                del session.users[node]
                continue
            reply = shared[node]
            for dst, ct in zip(ids_of(reply["dst"]), blobs(reply, "ct"), strict=True):
                session.cipher_to.setdefault(dst, {})[node] = ct
        self._need(session, len(session.users), "share exchange")
        for dst in session.cipher_to:  # only shares of nodes that finished both stages
            session.cipher_to[dst] = {
                s: c for s, c in session.cipher_to[dst].items() if s in session.users
            }
        session.wall_s = time.monotonic() - started
        return session

    def unmask(
        self, grid: Grid, session: Session, masked: Mapping[int, tuple[Params, int]]
    ) -> Params:
        """Stage 4: the weighted mean delta of the nodes in `masked` (the others dropped)."""
        started = time.monotonic()
        active = sorted(masked)
        dropped = [n for n in session.nodes if n not in masked]
        self._need(session, len(active), "masked upload")
        request = ConfigRecord({"active": ids_text(active), "dropped": ids_text(dropped)})
        replies = self._exchange(grid, UNMASK, {n: request for n in active}, session)
        revealed: dict[int, list[bytes]] = {}
        for reply in replies.values():
            for owner, share in zip(ids_of(reply["owners"]), blobs(reply, "shares"), strict=True):
                revealed.setdefault(owner, []).append(share)
        mean = unmask_mean(
            [masked[n][0] for n in active],
            weights=[masked[n][1] for n in active],
            active=active,
            dropped=dropped,
            revealed=revealed,
            pk1=session.pk1,
            threshold=session.threshold,
            clipping_range=self.clipping_range,
        )
        session.wall_s += time.monotonic() - started
        return mean

    def _need(self, session: Session, count: int, stage: str) -> None:
        if count < max(2, session.threshold):
            raise RoundFailed(
                f"secure aggregation needs at least {max(2, session.threshold)} nodes; "
                f"{count} left after the {stage} (refused: {session.refused})"
            )

    def _observe(self, direction: str, message: Message) -> None:
        if self.observer is not None:
            self.observer(direction, message)


def check_masked(session: Session, node: int, user: str, upload: Params) -> None:
    """A train reply of a secure round: from a node of the key exchange, for the user it claimed
    there, with a masked (uint64) upload; else `ReplyRefused` (the node then counts as dropped)."""
    if node not in session.users:
        raise ReplyRefused(f"node {node} did not take part in this round's key exchange")
    if session.users[node] != user:
        raise ReplyRefused(
            f"node {node} claimed {session.users[node]!r} at key exchange, now {user!r}"
        )
    for key, value in upload.items():
        if value.dtype != np.uint64:
            raise ReplyRefused(f"node {node}: masked upload holds {key!r} as {value.dtype}")
