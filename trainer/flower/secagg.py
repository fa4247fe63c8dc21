"""Secure aggregation of the shared part: the server learns only the weighted sum of updates.

A SecAgg+-style exchange (Bell et al. 2020, with every pair of participants as neighbours) run as
three extra Message-API round trips inside one training round, built on Flower's own primitives
(`flwr.common.secure_aggregation`: ECDH shared keys, Fernet encryption, Shamir shares,
quantization, the share plaintext format) rather than new cryptography:

1. keys (`query.secagg_keys`): every node makes two EC key pairs (masks, share encryption) and
   replies with the public keys and the user it trains for; the server checks the claim against
   the node bindings *here*, before any mask exists (`Admission.admit` on the authenticated
   `src_node_id`), so a refused node never becomes part of the masked sum.
2. shares (`query.secagg_shares`): the server relays all public keys; each node draws a self-mask
   seed and Shamir-shares it and its mask private key among all participants, each share
   encrypted for its peer; the server relays the ciphertexts with the train message.
3. train: the node trains, takes its update `delta = upload - global`, quantizes it
   (`quantize`, per-coordinate clipping range `secagg-range`), multiplies it by its example count
   `n` (sent in clear: the server needs it for records and the weight total) and adds, modulo
   2**64, its self mask and one pairwise mask per peer (added if its id is larger, subtracted if
   smaller), so the pairwise masks cancel in the sum.
4. unmask (`query.secagg_unmask`): the server names the nodes whose vectors it summed and those
   that dropped out; each survivor reveals its shares of the active nodes' self-mask seeds and of
   the dropped nodes' mask keys (never both for one node), the server reconstructs them
   (threshold `n // 2 + 1`), removes the masks, dequantizes and divides by the total weight.

The mask generator is AES-256-CTR keyed by the full 32-byte seed (uniform on 2**64 words), not
Flower's `pseudo_rand_gen`, which folds its seed into a 32-bit NumPy seed: a server could then
search a pair's mask seed. Client state between the stages lives in `context.state`
(`ConfigRecord` "secagg"); a new key exchange each round. This module knows nothing about methods,
publishing or records; `strategy.py` and `apps.py` call it.
"""

from __future__ import annotations

import base64
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from fedpersona.trainer.errors import AggregationError, ReplyRefused, RoundFailed
from fedpersona.trainer.flower.admission import Admission
from fedpersona.trainer.flower.packing import pack, unpack
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
    generate_shared_key,
)
from flwr.common.secure_aggregation.quantization import quantize
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.serverapp import Grid
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

log = logging.getLogger(__name__)

Params = dict[str, np.ndarray]

SECAGG_KEY = "secagg"  # ConfigRecord key in messages and in `context.state`
KEYS, SHARES, UNMASK = "secagg_keys", "secagg_shares", "secagg_unmask"  # query actions
QUANTIZATION_RANGE = 2**24  # integer levels of one client's quantized coordinate
_EXACT = 2**53  # sums below this dequantize exactly in float64


@dataclass(frozen=True)
class KeyPairs:
    sk1: bytes  # pairwise masks (ECDH with peers' pk1)
    pk1: bytes
    sk2: bytes  # share encryption (ECDH with peers' pk2)
    pk2: bytes


def new_keys() -> KeyPairs:
    sk1, pk1 = generate_key_pairs()
    sk2, pk2 = generate_key_pairs()
    return KeyPairs(
        private_key_to_bytes(sk1),
        public_key_to_bytes(pk1),
        private_key_to_bytes(sk2),
        public_key_to_bytes(pk2),
    )


def threshold_of(participants: int) -> int:
    """Shares needed to rebuild a secret: a strict majority, at least 2."""
    return max(2, participants // 2 + 1)


def _key(a_private: bytes, b_public: bytes) -> bytes:
    return generate_shared_key(bytes_to_private_key(a_private), bytes_to_public_key(b_public))


def mask_stream(seed: bytes, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Uniform uint64 arrays from a 32-byte seed (AES-256-CTR keystream)."""
    raw = base64.urlsafe_b64decode(seed) if len(seed) == 44 else seed
    if len(raw) != 32:
        raise AggregationError(f"a mask seed is 32 bytes, got {len(raw)}")
    total = sum(int(np.prod(s, dtype=np.int64)) for s in shapes)
    encryptor = Cipher(algorithms.AES(raw), modes.CTR(b"\0" * 16)).encryptor()
    words = np.frombuffer(encryptor.update(b"\0" * (8 * total)), dtype="<u8")
    out, offset = [], 0
    for shape in shapes:
        count = int(np.prod(shape, dtype=np.int64))
        out.append(words[offset : offset + count].astype(np.uint64).reshape(shape))
        offset += count
    return out


# ------------------------------------------------------------------------------ client math


def make_shares(
    own: int, keys: KeyPairs, peers: Mapping[int, tuple[bytes, bytes]], threshold: int
) -> tuple[bytes, dict[int, tuple[bytes, bytes]], dict[int, bytes]]:
    """(self-mask seed, this node's own (seed share, sk1 share), ciphertext per peer).

    `peers` maps every participant (this node included) to its (pk1, pk2), in id order."""
    ids = sorted(peers)
    if own not in peers or peers[own] != (keys.pk1, keys.pk2):
        raise RoundFailed(f"node {own}: its own public keys were relayed wrongly")
    flat = [k for pair in peers.values() for k in pair]
    if len(set(flat)) != len(flat):
        raise RoundFailed("two participants relayed the same public key")
    if len(ids) < threshold:
        raise RoundFailed(f"{len(ids)} participants, fewer than the threshold {threshold}")
    seed = os.urandom(32)
    b_shares = create_shares(seed, threshold, len(ids))
    sk_shares = create_shares(keys.sk1, threshold, len(ids))
    cipher: dict[int, bytes] = {}
    held: dict[int, tuple[bytes, bytes]] = {}
    for i, peer in enumerate(ids):
        if peer == own:
            held[own] = (b_shares[i], sk_shares[i])
            continue
        plain = share_keys_plaintext_concat(own, peer, b_shares[i], sk_shares[i])
        cipher[peer] = encrypt(_key(keys.sk2, peers[peer][1]), plain)
    return seed, held, cipher


def open_shares(
    own: int, keys: KeyPairs, peers: Mapping[int, tuple[bytes, bytes]], cipher: Mapping[int, bytes]
) -> dict[int, tuple[bytes, bytes]]:
    """The (seed share, sk1 share) each peer sent this node, checked for source and target."""
    out: dict[int, tuple[bytes, bytes]] = {}
    for src, ciphertext in cipher.items():
        plain = decrypt(_key(keys.sk2, peers[src][1]), ciphertext)
        actual, dst, b_share, sk_share = share_keys_plaintext_separate(plain)
        if actual != src or dst != own:
            raise RoundFailed(f"node {own}: a share relayed as {src}->{own} is {actual}->{dst}")
        out[src] = (b_share, sk_share)
    return out


def mask_update(
    delta: Params,
    *,
    weight: int,
    own: int,
    seed: bytes,
    sk1: bytes,
    peer_pk1: Mapping[int, bytes],
    clipping_range: float,
) -> Params:
    """`weight * quantize(delta) + self mask +- pairwise masks` modulo 2**64, per key (sorted)."""
    keys = sorted(delta)
    shapes = [np.shape(delta[k]) for k in keys]
    values = [np.asarray(delta[k], dtype=np.float64) for k in keys]
    quantized = quantize(values, clipping_range, QUANTIZATION_RANGE)
    out = [q.astype(np.uint64) * np.uint64(weight) for q in quantized]
    for i, m in enumerate(mask_stream(seed, shapes)):
        out[i] += m
    for peer, pk1 in peer_pk1.items():
        if peer == own:
            continue
        for i, m in enumerate(mask_stream(_key(sk1, pk1), shapes)):
            out[i] = out[i] + m if own > peer else out[i] - m
    return dict(zip(keys, out, strict=True))


def reveal(
    held: Mapping[int, tuple[bytes, bytes]], *, active: Iterable[int], dropped: Iterable[int]
) -> dict[int, bytes]:
    """Seed shares of active nodes, key shares of dropped ones; never both for one node."""
    active, dropped = set(active), set(dropped)
    if active & dropped:
        raise RoundFailed(f"the server asked for both shares of nodes {sorted(active & dropped)}")
    out = {node: held[node][0] for node in active if node in held}
    out.update({node: held[node][1] for node in dropped if node in held})
    return out


# ------------------------------------------------------------------------------ server math


def unmask_mean(
    masked: list[Params],
    *,
    weights: list[int],
    active: list[int],
    dropped: list[int],
    revealed: Mapping[int, list[bytes]],
    pk1: Mapping[int, bytes],
    threshold: int,
    clipping_range: float,
) -> Params:
    """The example-weighted mean of the active nodes' deltas from their masked vectors."""
    if not masked or len(masked) != len(active) or len(weights) != len(active):
        raise AggregationError("one masked vector and weight per active node is needed")
    total = sum(int(w) for w in weights)
    if total <= 0 or total * QUANTIZATION_RANGE >= _EXACT:
        raise AggregationError(f"total weight {total} is out of range for secure aggregation")
    keys = sorted(masked[0])
    if any(sorted(m) != keys for m in masked):
        raise AggregationError("masked vectors with different keys")
    acc = [np.zeros(np.shape(masked[0][k]), dtype=np.uint64) for k in keys]
    for vector in masked:
        for i, k in enumerate(keys):
            acc[i] += np.asarray(vector[k], dtype=np.uint64)
    shapes = [a.shape for a in acc]
    for node in [*active, *dropped]:
        shares = revealed.get(node, [])
        if len(shares) < threshold:
            raise AggregationError(f"{len(shares)} shares of node {node}, need {threshold}")
        secret = combine_shares(shares)
        if node in active:
            for i, m in enumerate(mask_stream(secret, shapes)):
                acc[i] -= m
            continue
        for peer in active:  # undo the dropped node's pairwise masks in each survivor
            for i, m in enumerate(mask_stream(_key(secret, pk1[peer]), shapes)):
                acc[i] = acc[i] + m if node > peer else acc[i] - m
    step = 2.0 * clipping_range / QUANTIZATION_RANGE
    out: Params = {}
    for k, summed in zip(keys, acc, strict=True):
        out[k] = (summed.astype(np.float64) * step / total - clipping_range).astype(np.float32)
    return out


def quantization_bound(clipping_range: float) -> float:
    """The largest error of one coordinate of the mean (stochastic rounding: < 1 step)."""
    return 2.0 * clipping_range / QUANTIZATION_RANGE


# ------------------------------------------------------------------------- client messages


def _ids(values: object) -> list[int]:
    return [int(v) for v in values]  # type: ignore[attr-defined]


def client_keys(context: Context, own: int, user: str) -> ConfigRecord:
    """Stage 1: new key pairs, kept in the node's state; reply with the public halves."""
    keys = new_keys()
    context.state.config_records[SECAGG_KEY] = ConfigRecord(
        {"sk1": keys.sk1, "pk1": keys.pk1, "sk2": keys.sk2, "pk2": keys.pk2}
    )
    return ConfigRecord({"pk1": keys.pk1, "pk2": keys.pk2, "user": user})


def _state(context: Context) -> ConfigRecord:
    if SECAGG_KEY not in context.state.config_records:
        raise RoundFailed("a secure-aggregation stage arrived before this node's key exchange")
    return context.state.config_records[SECAGG_KEY]


def _keys(state: ConfigRecord) -> KeyPairs:
    return KeyPairs(*(bytes(state[k]) for k in ("sk1", "pk1", "sk2", "pk2")))  # type: ignore[arg-type]


def client_shares(context: Context, own: int, request: ConfigRecord) -> ConfigRecord:
    """Stage 2: Shamir-share the self-mask seed and sk1, encrypted per peer."""
    state = _state(context)
    nodes = _ids(request["nodes"])  # type: ignore[arg-type]
    peers = dict(zip(nodes, zip(request["pk1"], request["pk2"], strict=True), strict=True))  # type: ignore[arg-type]
    threshold = int(request["threshold"])  # type: ignore[arg-type]
    seed, held, cipher = make_shares(own, _keys(state), peers, threshold)  # type: ignore[arg-type]
    state["seed"] = seed
    state["nodes"] = [str(n) for n in nodes]
    state["peer-pk1"] = [bytes(peers[n][0]) for n in nodes]
    state["peer-pk2"] = [bytes(peers[n][1]) for n in nodes]
    state["held-from"] = [str(own)]
    state["held-b"] = [held[own][0]]
    state["held-sk"] = [held[own][1]]
    return ConfigRecord({"dst": [str(p) for p in cipher], "ct": list(cipher.values())})


def client_mask(
    context: Context, own: int, incoming: ConfigRecord, delta: Params, *, weight: int, clip: float
) -> Params:
    """Stage 3: open the peers' shares (kept for stage 4) and mask this node's update."""
    state = _state(context)
    nodes = _ids(state["nodes"])  # type: ignore[arg-type]
    peers = dict(zip(nodes, zip(state["peer-pk1"], state["peer-pk2"], strict=True), strict=True))  # type: ignore[arg-type]
    cipher = dict(zip(_ids(incoming["src"]), incoming["ct"], strict=True))  # type: ignore[arg-type]
    opened = open_shares(own, _keys(state), peers, cipher)  # type: ignore[arg-type]
    state["held-from"] = [*state["held-from"], *(str(s) for s in opened)]  # type: ignore[misc]
    state["held-b"] = [*state["held-b"], *(b for b, _ in opened.values())]  # type: ignore[misc]
    state["held-sk"] = [*state["held-sk"], *(s for _, s in opened.values())]  # type: ignore[misc]
    # Mask with exactly the peers whose shares arrived (the server dropped the others).
    peer_pk1 = {src: bytes(peers[src][0]) for src in opened}  # type: ignore[arg-type]
    return mask_update(
        delta,
        weight=weight,
        own=own,
        seed=bytes(state["seed"]),  # type: ignore[arg-type]
        sk1=_keys(state).sk1,
        peer_pk1=peer_pk1,
        clipping_range=clip,
    )


def client_unmask(context: Context, request: ConfigRecord) -> ConfigRecord:
    """Stage 4: reveal the shares the server may have; then forget this round's secrets."""
    state = _state(context)
    held = {
        int(n): (bytes(b), bytes(s))  # type: ignore[arg-type]
        for n, b, s in zip(state["held-from"], state["held-b"], state["held-sk"], strict=True)  # type: ignore[arg-type]
    }
    out = reveal(held, active=_ids(request["active"]), dropped=_ids(request["dropped"]))  # type: ignore[arg-type]
    del context.state.config_records[SECAGG_KEY]
    return ConfigRecord({"owners": [str(n) for n in out], "shares": list(out.values())})


# ------------------------------------------------------------------------- server driver

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
        return ConfigRecord({"src": [str(s) for s in sources], "ct": list(sources.values())})


def _size(content: RecordDict) -> int:
    return sum(r.count_bytes() for r in content.config_records.values()) + sum(
        r.count_bytes() for r in content.array_records.values()
    )


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
            except (KeyError, ReplyRefused) as e:
                session.refused.append(f"key exchange: {e}")
                continue
            session.users[node] = user
            session.pk1[node], pk2[node] = bytes(reply["pk1"]), bytes(reply["pk2"])  # type: ignore[arg-type]
        if len(set(session.users.values())) != len(session.users):
            raise RoundFailed(f"two nodes claim the same user: {sorted(session.users.values())}")
        self._need(session, len(session.users), "key exchange")
        session.threshold = threshold_of(len(session.users))
        ids = session.nodes
        request = ConfigRecord(
            {
                "nodes": [str(n) for n in ids],
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
            for dst, ct in zip(_ids(shared[node]["dst"]), shared[node]["ct"], strict=True):  # type: ignore[arg-type]
                session.cipher_to.setdefault(dst, {})[node] = bytes(ct)  # type: ignore[arg-type]
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
        request = ConfigRecord(
            {"active": [str(n) for n in active], "dropped": [str(n) for n in dropped]}
        )
        replies = self._exchange(grid, UNMASK, {n: request for n in active}, session)
        revealed: dict[int, list[bytes]] = {}
        for reply in replies.values():
            for owner, share in zip(_ids(reply["owners"]), reply["shares"], strict=True):  # type: ignore[arg-type]
                revealed.setdefault(owner, []).append(bytes(share))  # type: ignore[arg-type]
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


def masked_record(masked: Params) -> ArrayRecord:
    """A masked vector on the wire (uint64 arrays, `packing.pack`)."""
    return pack(masked)


def masked_of(record: ArrayRecord) -> Params:
    values = unpack(record)
    for key, value in values.items():
        if value.dtype != np.uint64:
            raise ReplyRefused(f"a masked upload holds {key!r} as {value.dtype}, not uint64")
    return values
