"""The secure-aggregation math of `fedpersona.trainer.flower.secagg`, on Flower's primitives.

Three to four clients run the four stages' pure functions: each masked vector alone looks
uniform and unlike the plain update, the unmasked sum equals the plain example-weighted mean
within the quantization bound, and a client that drops out after masking is recovered from the
survivors' shares of its mask key. The option is refused with rules that need each update.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from fedpersona.adapters import AdapterStore, Slot, load_lora
from fedpersona.trainer.commands.spec_args import add_spec_arguments, spec_from_args
from fedpersona.trainer.data.personas import write_silos
from fedpersona.trainer.errors import AggregationError, ConfigError, RoundFailed
from fedpersona.trainer.flower.packing import unpack
from fedpersona.trainer.flower.runconfig import RunConfig, config_of
from fedpersona.trainer.flower.secagg import (
    QUANTIZATION_RANGE,
    SECAGG_KEY,
    blob,
    blobs,
    client_keys,
    client_mask,
    client_shares,
    client_unmask,
    ids_of,
    ids_text,
    make_shares,
    mask_update,
    new_keys,
    open_shares,
    quantization_bound,
    reveal,
    threshold_of,
    unmask_mean,
)
from fedpersona.trainer.flower.simulation import simulate
from fedpersona.trainer.methods.aggregation import weighted_mean
from fedpersona.trainer.models.basemodel import ModelPair
from fedpersona.trainer.rounds.records import (
    SECURE_AGGREGATION_METHODS,
    RoundSpec,
    RunRecords,
    RunState,
    new_run_id,
)
from flwr.app import ConfigRecord, Context, Message, RecordDict
from pydantic import ValidationError

CLIP = 1.0
IDS = [101, 7, 4_000_000_000_123, 55]  # Flower node ids are large and unordered


def _deltas(rng: np.random.Generator, n: int) -> list[dict[str, np.ndarray]]:
    return [
        {
            "a.lora_A": rng.normal(0, 0.02, (4, 16)).astype(np.float32),
            "a.lora_B": rng.normal(0, 0.01, (16, 4)).astype(np.float32),
        }
        for _ in range(n)
    ]


def _run(ids, deltas, weights, drop=()):
    """All four stages in memory; `drop`: ids that mask but whose vectors never arrive."""
    keys = {i: new_keys() for i in ids}
    peers = {i: (keys[i].pk1, keys[i].pk2) for i in ids}
    t = threshold_of(len(ids))
    seeds, held, inbox = {}, {}, {i: {} for i in ids}
    for i in ids:
        seeds[i], held[i], cipher = make_shares(i, keys[i], peers, t)
        for dst, ct in cipher.items():
            inbox[dst][i] = ct
    masked = {}
    for i, delta, w in zip(ids, deltas, weights, strict=True):
        opened = open_shares(i, keys[i], peers, inbox[i])
        held[i].update(opened)
        masked[i] = mask_update(
            delta,
            weight=w,
            own=i,
            seed=seeds[i],
            sk1=keys[i].sk1,
            peer_pk1={s: keys[s].pk1 for s in opened},
            clipping_range=CLIP,
        )
    active = [i for i in ids if i not in drop]
    revealed: dict[int, list[bytes]] = {}
    for i in active:
        for owner, share in reveal(held[i], active=active, dropped=list(drop)).items():
            revealed.setdefault(owner, []).append(share)
    mean = unmask_mean(
        [masked[i] for i in active],
        weights=[weights[ids.index(i)] for i in active],
        active=active,
        dropped=list(drop),
        revealed=revealed,
        pk1={i: keys[i].pk1 for i in ids},
        threshold=t,
        clipping_range=CLIP,
    )
    return masked, mean


def test_unmasked_sum_is_the_weighted_mean_within_quantization_error() -> None:
    rng = np.random.default_rng(0)
    deltas, weights = _deltas(rng, 4), [3, 50, 8, 17]
    _, mean = _run(IDS, deltas, weights)
    plain = weighted_mean(list(zip(deltas, weights, strict=True)))
    for key in plain:
        err = np.abs(mean[key] - plain[key]).max()
        assert err <= quantization_bound(CLIP) + 1e-7, (key, err)
    assert quantization_bound(CLIP) == pytest.approx(2 / QUANTIZATION_RANGE)


def test_a_masked_vector_alone_looks_uniform_and_unlike_the_update() -> None:
    rng = np.random.default_rng(1)
    deltas = [{"w": rng.normal(0, 0.02, (64, 64)).astype(np.float32)} for _ in range(3)]
    masked, _ = _run(IDS[:3], deltas, [5, 5, 5])
    for vector, delta in zip(masked.values(), deltas, strict=True):
        words = np.concatenate([v.ravel() for v in vector.values()])
        assert words.dtype == np.uint64
        # The plain quantized values all lie below 5 * 2**24 (< 2**27); masked words spread over
        # the whole 2**64 range: top bit set about half the time, bytes near uniform.
        assert (words < 2**27).mean() < 0.01
        top = (words >> np.uint64(63)).mean()
        assert 0.35 < top < 0.65
        counts = np.bincount(words.view(np.uint8), minlength=256)
        assert counts.max() < 1.5 * counts.mean()  # 128 expected per byte value
        plain = np.concatenate([delta[k].ravel() for k in sorted(delta)])
        assert abs(np.corrcoef(words.astype(np.float64), plain)[0, 1]) < 0.3


def test_a_dropout_after_masking_is_recovered_from_the_survivors() -> None:
    rng = np.random.default_rng(2)
    deltas, weights = _deltas(rng, 4), [10, 20, 30, 40]
    _, mean = _run(IDS, deltas, weights, drop=(IDS[2],))
    survivors = [(d, w) for i, d, w in zip(IDS, deltas, weights, strict=True) if i != IDS[2]]
    plain = weighted_mean(survivors)
    for key in plain:
        assert np.abs(mean[key] - plain[key]).max() <= quantization_bound(CLIP) + 1e-7


def test_too_few_shares_cannot_unmask() -> None:
    rng = np.random.default_rng(3)
    with pytest.raises(AggregationError, match="shares of node"):
        _run(IDS[:3], _deltas(rng, 3), [1, 1, 1], drop=(IDS[0], IDS[1]))


def test_a_client_never_reveals_both_shares_of_one_node() -> None:
    held = {1: (b"seed-share", b"key-share")}
    with pytest.raises(RoundFailed, match="both shares"):
        reveal(held, active=[1], dropped=[1])


def test_relayed_keys_are_checked() -> None:
    keys = {i: new_keys() for i in (1, 2)}
    peers = {1: (keys[1].pk1, keys[1].pk2), 2: (keys[1].pk1, keys[2].pk2)}
    with pytest.raises(RoundFailed, match="same public key"):
        make_shares(1, keys[1], peers, 2)
    swapped = {1: (keys[2].pk1, keys[2].pk2), 2: (keys[1].pk1, keys[1].pk2)}
    with pytest.raises(RoundFailed, match="own public keys"):
        make_shares(1, keys[1], swapped, 2)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"algorithm": "perfit"}, "does not aggregate a weighted mean"),
        ({"algorithm": "local"}, "does not aggregate a weighted mean"),
        ({"aggregation": "median"}, "cannot run"),
        ({"aggregation": "krum"}, "cannot run"),
        ({"clip_norm": 0.5}, "clip-norm and dp-noise"),
        ({"clip_norm": 0.5, "dp_noise": 1.0}, "clip-norm and dp-noise"),
    ],
)
def test_secure_aggregation_refuses_what_needs_each_clients_update(
    changes: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        RoundSpec(**{"algorithm": "fedavg", "secure_aggregation": True, **changes})


@pytest.mark.parametrize("algorithm", SECURE_AGGREGATION_METHODS)
def test_secure_aggregation_is_offered_for_weighted_mean_methods(algorithm: str) -> None:
    assert RoundSpec(algorithm=algorithm, secure_aggregation=True).secure_aggregation


def test_the_flag_reaches_the_spec_and_the_flower_run_config(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_spec_arguments(parser)
    args = parser.parse_args(["--algorithm", "fedavg", "--secure-aggregation"])
    spec = spec_from_args(args)
    assert spec.secure_aggregation and spec.secagg_range == 1.0
    assert not spec_from_args(parser.parse_args([])).secure_aggregation
    config = config_of(spec, run_id=new_run_id(), home=tmp_path, users=("alice",)).to_flower()
    assert config["secure-aggregation"] is True
    assert RunConfig.from_flower(config).spec.secure_aggregation
    with pytest.raises(ConfigError, match="cannot run"):
        RunConfig.from_flower({**config, "aggregation": "median"})


@pytest.mark.flower
def test_secure_rounds_in_the_simulation_engine(tmp_path: Path, micro_models: ModelPair) -> None:
    """Real messages: round 1 uploads masked words, FedAvg-FT's final (personalization) round
    shares nothing (no unmask stage, the global stays), and both rounds publish. 40-80 s: Ray
    start-up and two rounds of three real clients; the only secure-round test in simulation."""
    home = tmp_path / "home"
    personas = {"alice": "pirate", "bob": "chef", "carol": "poet"}
    users = tuple(personas)
    write_silos(home / "silos", personas, n_train=4, n_eval=2)
    (home / "models").mkdir()
    (home / "models" / "large").symlink_to(micro_models.large.path)
    spec = RoundSpec(
        algorithm="fedavg-ft",
        rounds=2,
        users=users,
        local_steps=2,
        batch_size=2,
        max_len=64,
        rank=4,
        secure_aggregation=True,
    )
    status = RunRecords(home / "runs").create(spec, users=list(users))
    config = config_of(spec, run_id=status.id, home=home, users=users)
    seen: list[tuple[str, Message]] = []

    final = simulate(config, observer=lambda d, m: seen.append((d, m)), cpus=1)

    assert final.state == RunState.succeeded, final.error
    kinds = [(d, m.metadata.message_type) for d, m in seen]
    per_round = [("down", t) for t in ("query.secagg_keys", "query.secagg_shares", "train")]
    assert kinds.count(("down", "query.secagg_unmask")) == len(users)  # round 1 only
    for kind in per_round:
        assert kinds.count(kind) == 2 * len(users)
    uploads = [
        unpack(m.content.array_records["upload"])
        for d, m in seen
        if d == "up" and m.metadata.message_type == "train"
    ]
    assert all(v.dtype == np.uint64 for u in uploads[: len(users)] for v in u.values())
    assert all(not u for u in uploads[len(users) :])  # the final round shares nothing
    first, second = final.rounds
    assert first.secure_aggregation and first.secure_aggregation["bytes-up"] > 0
    assert {c.user for c in first.clients} == set(users) and not first.refused
    store = AdapterStore(home / "store")
    glob = [
        load_lora(store.get(Slot.global_adapter("fedavg-ft"), r.global_version).path).tensors  # type: ignore[arg-type]
        for r in (first, second)
    ]
    assert all(torch.equal(glob[0][k], glob[1][k]) for k in glob[0])


def test_the_node_stages_on_real_contexts_relay_to_the_weighted_mean() -> None:
    """The node's side (`client_keys` ... `client_unmask`) with its state in a real Flower
    `Context`, the server's relaying done as `SecAggServer` does it; one node drops after
    masking. A node forgets its round secrets after revealing."""
    rng = np.random.default_rng(4)
    ids = IDS[:3]
    contexts = {i: Context(1, i, {}, RecordDict(), {}) for i in ids}
    deltas, weights = _deltas(rng, 3), [4, 9, 2]
    public = {i: client_keys(contexts[i], i, f"user{i}") for i in ids}
    request = ConfigRecord(
        {
            "nodes": ids_text(ids),
            "pk1": [public[i]["pk1"] for i in ids],
            "pk2": [public[i]["pk2"] for i in ids],
            "threshold": threshold_of(len(ids)),
        }
    )
    inbox: dict[int, dict[int, bytes]] = {i: {} for i in ids}
    for i in ids:
        reply = client_shares(contexts[i], i, request)
        for dst, ct in zip(ids_of(reply["dst"]), blobs(reply, "ct"), strict=True):
            inbox[dst][i] = ct
    masked = {}
    for i, delta, w in zip(ids, deltas, weights, strict=True):
        incoming = ConfigRecord({"src": ids_text(inbox[i]), "ct": list(inbox[i].values())})
        masked[i] = client_mask(contexts[i], i, incoming, delta, weight=w, clip=CLIP)
    active, dropped = ids[:2], ids[2:]
    revealed: dict[int, list[bytes]] = {}
    ask = ConfigRecord({"active": ids_text(active), "dropped": ids_text(dropped)})
    for i in active:
        reply = client_unmask(contexts[i], ask)
        for owner, share in zip(ids_of(reply["owners"]), blobs(reply, "shares"), strict=True):
            revealed.setdefault(owner, []).append(share)
        assert SECAGG_KEY not in contexts[i].state.config_records
    mean = unmask_mean(
        [masked[i] for i in active],
        weights=weights[:2],
        active=active,
        dropped=dropped,
        revealed=revealed,
        pk1={i: blob(public[i], "pk1") for i in ids},
        threshold=threshold_of(len(ids)),
        clipping_range=CLIP,
    )
    plain = weighted_mean(list(zip(deltas[:2], weights[:2], strict=True)))
    for key in plain:
        assert np.abs(mean[key] - plain[key]).max() <= quantization_bound(CLIP) + 1e-7
    with pytest.raises(RoundFailed, match="before this node's key exchange"):
        client_unmask(contexts[active[0]], ask)  # secrets are gone: nothing more to reveal
