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
(`ConfigRecord` "secagg"); a new key exchange each round. This module holds the math and the
node's side (`answer`, `masked_upload`, called by `apps.py`); the server's stages are in
`fedpersona.trainer.flower.secagg_server`. It knows nothing about methods, publishing or records.
"""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from fedpersona.trainer.errors import AggregationError, RoundFailed
from fedpersona.trainer.flower.packing import pack
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


def mask_stream(seed: bytes, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
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


def ids_of(text: object) -> list[int]:
    """Node ids from their comma-separated form (ConfigRecord lists cannot be empty)."""
    return [int(v) for v in str(text).split(",") if v]


def ids_text(ids: Iterable[int]) -> str:
    return ",".join(str(n) for n in ids)


def blob(record: ConfigRecord, key: str) -> bytes:
    """`record[key]` if it is bytes; else `RoundFailed` (a malformed stage message)."""
    value = record.get(key)
    if not isinstance(value, bytes):
        raise RoundFailed(f"secure aggregation: {key!r} is not bytes")
    return value


def blobs(record: ConfigRecord, key: str) -> list[bytes]:
    """`record[key]` if it is a list of bytes; else `RoundFailed`."""
    value = record.get(key)
    if not isinstance(value, list) or not all(isinstance(v, bytes) for v in value):
        raise RoundFailed(f"secure aggregation: {key!r} is not a list of bytes")
    return [v for v in value if isinstance(v, bytes)]


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
    return KeyPairs(*(blob(state, k) for k in ("sk1", "pk1", "sk2", "pk2")))


def _peers(
    record: ConfigRecord, nodes: list[int], prefix: str = ""
) -> dict[int, tuple[bytes, bytes]]:
    pairs = zip(blobs(record, f"{prefix}pk1"), blobs(record, f"{prefix}pk2"), strict=True)
    return dict(zip(nodes, pairs, strict=True))


def client_shares(context: Context, own: int, request: ConfigRecord) -> ConfigRecord:
    """Stage 2: Shamir-share the self-mask seed and sk1, encrypted per peer."""
    state = _state(context)
    nodes = ids_of(request["nodes"])
    peers = _peers(request, nodes)
    threshold = request["threshold"]
    if not isinstance(threshold, int):
        raise RoundFailed("secure aggregation: the threshold is not an integer")
    seed, held, cipher = make_shares(own, _keys(state), peers, threshold)
    state["seed"] = seed
    state["nodes"] = ids_text(nodes)
    state["peer-pk1"] = [peers[n][0] for n in nodes]  # this node's own keys stay as they are
    state["peer-pk2"] = [peers[n][1] for n in nodes]
    state["held-from"] = ids_text([own])
    state["held-b"] = [held[own][0]]
    state["held-sk"] = [held[own][1]]
    return ConfigRecord({"dst": ids_text(cipher), "ct": list(cipher.values())})


def client_mask(
    context: Context, own: int, incoming: ConfigRecord, delta: Params, *, weight: int, clip: float
) -> Params:
    """Stage 3: open the peers' shares (kept for stage 4) and mask this node's update."""
    state = _state(context)
    keys = _keys(state)
    peers = _peers(state, ids_of(state["nodes"]), prefix="peer-")
    cipher = dict(zip(ids_of(incoming["src"]), blobs(incoming, "ct"), strict=True))
    opened = open_shares(own, keys, peers, cipher)
    state["held-from"] = ids_text([*ids_of(state["held-from"]), *opened])
    state["held-b"] = [*blobs(state, "held-b"), *(b for b, _ in opened.values())]
    state["held-sk"] = [*blobs(state, "held-sk"), *(s for _, s in opened.values())]
    # Mask with exactly the peers whose shares arrived (the server dropped the others).
    return mask_update(
        delta,
        weight=weight,
        own=own,
        seed=blob(state, "seed"),
        sk1=keys.sk1,
        peer_pk1={src: peers[src][0] for src in opened},
        clipping_range=clip,
    )


def client_unmask(context: Context, request: ConfigRecord) -> ConfigRecord:
    """Stage 4: reveal the shares the server may have; then forget this round's secrets."""
    state = _state(context)
    pairs = zip(blobs(state, "held-b"), blobs(state, "held-sk"), strict=True)
    held = dict(zip(ids_of(state["held-from"]), pairs, strict=True))
    out = reveal(held, active=ids_of(request["active"]), dropped=ids_of(request["dropped"]))
    del context.state.config_records[SECAGG_KEY]
    return ConfigRecord({"owners": ids_text(out), "shares": list(out.values())})


def masked_record(masked: Params) -> ArrayRecord:
    """A masked vector on the wire (uint64 arrays, `packing.pack`)."""
    return pack(masked)


def masked_upload(
    message: Message,
    context: Context,
    *,
    global_params: Params,
    upload: Params,
    weight: int,
    clip: float,
) -> ArrayRecord:
    """Stage 3 of a train message: this node's update (upload - global) masked, as the reply's
    upload; an empty upload (a round that shares nothing) stays empty."""
    if SECAGG_KEY not in message.content.config_records:
        raise RoundFailed("the run asks for secure aggregation but the server sent no shares")
    if not upload:
        return pack({})
    if set(upload) != set(global_params):
        raise RoundFailed("secure aggregation needs an upload shaped like the global params")
    delta = {k: np.asarray(upload[k], np.float64) - global_params[k] for k in upload}
    clipped = sum(int((np.abs(d) > clip).sum()) for d in delta.values())
    if clipped:
        log.warning("secure aggregation: %d update values clipped to +-%g", clipped, clip)
    incoming = message.content.config_records[SECAGG_KEY]
    masked = client_mask(context, context.node_id, incoming, delta, weight=weight, clip=clip)
    return masked_record(masked)


def answer(message: Message, context: Context, action: str, *, user: str) -> Message:
    """A node's reply to one secure-aggregation query (key exchange, shares or unmask)."""
    request = message.content.config_records.get(SECAGG_KEY, ConfigRecord({}))
    if action == KEYS:
        reply = client_keys(context, context.node_id, user)
    elif action == SHARES:
        reply = client_shares(context, context.node_id, request)
    elif action == UNMASK:
        reply = client_unmask(context, request)
    else:
        raise RoundFailed(f"unknown secure-aggregation query {action!r}")
    return Message(content=RecordDict({SECAGG_KEY: reply}), reply_to=message)
