"""Robust aggregation and admission: pure functions against numpy references and Flower's own.

The references are written independently (sorting, `np.median`, brute-force Krum) or taken from
Flower's Message-API strategies (`flwr.serverapp.strategy`'s `trim_mean`, `compute_distances`),
so the rules mean what Flower's FedMedian / FedTrimmedAvg / (Multi-)Krum mean.
"""

from __future__ import annotations

import numpy as np
import pytest
from fedpersona.trainer.errors import AggregationError, ReplyRefused
from fedpersona.trainer.flower.admission import Admission
from fedpersona.trainer.methods import LoraSpec, get_method
from fedpersona.trainer.methods.robust import (
    AggregationRule,
    clip_update,
    coordinate_median,
    krum_scores,
    multi_krum,
    trimmed_mean,
    update_norm,
)
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.multikrum import compute_distances
from hypothesis import given, settings
from hypothesis import strategies as st

SHAPES = {"a.lora_A.weight": (2, 3), "a.lora_B.weight": (3, 2)}


def params(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {k: rng.normal(0, scale, size=s) for k, s in SHAPES.items()}


def flat(p: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.ravel(p[k]) for k in sorted(p)])


@given(st.integers(1, 9), st.integers(0, 2**31 - 1))
@settings(max_examples=30, deadline=None)
def test_median_and_trimmed_mean_match_numpy_and_flower(n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    updates = [params(rng) for _ in range(n)]
    med = coordinate_median(updates)
    for k in SHAPES:
        stacked = np.stack([u[k] for u in updates])
        np.testing.assert_allclose(med[k], np.median(stacked, axis=0))
        for fraction in (0.0, 0.1, 0.25, 0.4):
            ours = trimmed_mean(updates, fraction)[k]
            np.testing.assert_allclose(ours, trim_mean(stacked, fraction), rtol=1e-12, atol=1e-15)
            cut = int(fraction * n)
            ref = np.sort(stacked, axis=0)[cut : n - cut].mean(axis=0)
            np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-15)


def test_krum_matches_a_brute_force_reference_and_flowers_distances() -> None:
    rng = np.random.default_rng(0)
    updates = [params(rng) for _ in range(7)] + [params(rng, scale=50.0)]
    f = 1
    vectors = [flat(u) for u in updates]
    n = len(vectors)
    brute = []
    for i in range(n):
        d = sorted(float(np.sum((vectors[i] - vectors[j]) ** 2)) for j in range(n) if j != i)
        brute.append(sum(d[: n - f - 2]))
    np.testing.assert_allclose(krum_scores(updates, f), brute, rtol=1e-9)
    records = [ArrayRecord({"w": Array(v)}) for v in vectors]
    flower = compute_distances(records)
    for i in range(n):
        assert sorted(np.delete(flower[i], i))[: n - f - 2] == pytest.approx(
            sorted(float(np.sum((vectors[i] - vectors[j]) ** 2)) for j in range(n) if j != i)[
                : n - f - 2
            ]
        )
    assert 7 not in multi_krum(updates, byzantine=f, keep=n - f)
    assert multi_krum(updates, byzantine=f, keep=1) == [int(np.argmin(brute))]


def test_clipping_bounds_the_norm_and_keeps_small_updates() -> None:
    rng = np.random.default_rng(1)
    big = params(rng, scale=10.0)
    clipped = clip_update(big, 1.0)
    assert update_norm(clipped) == pytest.approx(1.0)
    np.testing.assert_allclose(flat(clipped) / flat(big), 1.0 / update_norm(big))
    small = {k: v * 1e-3 for k, v in big.items()}
    np.testing.assert_allclose(flat(clip_update(small, 1.0)), flat(small))


def test_rules_around_a_method_resist_one_poisoned_client() -> None:
    method = get_method("fedavg", spec=LoraSpec(rank=2, alpha=4.0))
    rng = np.random.default_rng(2)
    previous = params(rng)
    direction = params(rng)  # honest clients agree on a direction, up to noise
    honest = [
        {
            k: previous[k] + 0.01 * (direction[k] + 0.3 * rng.normal(size=s))
            for k, s in SHAPES.items()
        }
        for _ in range(7)
    ]
    poisoned = {k: previous[k] - 100 * (honest[0][k] - previous[k]) for k in SHAPES}
    results = [(h, 10) for h in honest] + [(poisoned, 10)]
    clean = method.aggregate(previous=previous, results=[(h, 10) for h in honest])
    honest_norm = update_norm({k: clean[k] - previous[k] for k in SHAPES})

    def moved(rule: AggregationRule) -> float:
        got = rule.aggregate(method, previous=previous, results=results)
        return update_norm({k: got[k] - clean[k] for k in SHAPES}) / honest_norm

    assert moved(AggregationRule()) > 5  # the plain mean is dragged far away
    for rule in (
        AggregationRule(name="median"),
        AggregationRule(name="trimmed-mean", trim_fraction=0.2),
        AggregationRule(name="multi-krum", byzantine=1),
        AggregationRule(name="krum", byzantine=1),
    ):
        assert moved(rule) < 0.5, rule
    # The plain rule is exactly the method's own aggregation (no float64 round trip).
    plain = AggregationRule().aggregate(method, previous=previous, results=results)
    for k, v in method.aggregate(previous=previous, results=results).items():
        np.testing.assert_array_equal(plain[k], v)


def test_central_dp_noise_has_the_calibrated_scale() -> None:
    method = get_method("fedavg", spec=LoraSpec(rank=2, alpha=4.0))
    previous = {"w": np.zeros((200, 200), np.float32)}
    results = [({"w": np.full((200, 200), 5.0, np.float32)}, 1) for _ in range(4)]
    rule = AggregationRule(clip_norm=1.0, dp_noise=2.0)
    got = rule.aggregate(method, previous=previous, results=results, rng=np.random.default_rng(0))
    mean_update = 1.0 / 200  # each update clipped to norm 1, spread evenly over 200*200 entries
    assert float(np.mean(got["w"])) == pytest.approx(mean_update, abs=4 * 0.5 / 200)
    assert float(np.std(got["w"])) == pytest.approx(2.0 * 1.0 / 4, rel=0.02)
    with pytest.raises(AggregationError):
        AggregationRule(name="median", clip_norm=1.0, dp_noise=1.0)


def test_sparse_uploads_take_only_the_plain_mean() -> None:
    method = get_method("fedavg", spec=LoraSpec(rank=2, alpha=4.0))
    previous = {"w": np.zeros(3, np.float32)}
    with pytest.raises(AggregationError, match="shaped like the global"):
        AggregationRule(name="median").aggregate(
            method, previous=previous, results=[({"packed": np.zeros(5, np.uint8)}, 1)]
        )


def test_admission_binds_nodes_to_users_and_caps_examples() -> None:
    admission = Admission(
        bindings={7: frozenset({"alice"}), 9: frozenset({"mallory"})},
        round_users=frozenset({"alice", "mallory"}),
        max_examples=100,
    )
    assert admission.eligible([9, 3, 7]) == [7, 9]
    assert admission.admit(node_id=7, user="alice", num_examples=12) == 12
    assert admission.admit(node_id=7, user="alice", num_examples=10**9) == 100
    with pytest.raises(ReplyRefused, match="not for 'alice'"):
        admission.admit(node_id=9, user="alice", num_examples=5)
    with pytest.raises(ReplyRefused, match="not bound"):
        admission.admit(node_id=3, user="alice", num_examples=5)
    for bad in (0, -4, 2.5, True, "7"):
        with pytest.raises(ReplyRefused):
            admission.admit(node_id=7, user="alice", num_examples=bad)
    outside = Admission(round_users=frozenset({"bob"}))
    with pytest.raises(ReplyRefused, match="not in this round"):
        outside.admit(node_id=1, user="alice", num_examples=1)


@pytest.mark.parametrize(
    "rule",
    [
        AggregationRule(clip_norm=1.0, dp_noise=2.0),
        AggregationRule(clip_norm=1.0),
        AggregationRule(name="median"),
        AggregationRule(name="multi-krum", byzantine=1),
    ],
    ids=["dp", "clip", "median", "multi-krum"],
)
def test_a_round_without_uploads_keeps_the_global_under_every_rule(rule: AggregationRule) -> None:
    """PFTT's personalization round uploads nothing: no noise, no error, the global stays."""
    method = get_method("pftt", spec=LoraSpec(rank=2, alpha=4.0), personal_round=True)
    previous = {"w": np.arange(6, dtype=np.float32)}
    got = rule.aggregate(
        method, previous=previous, results=[({}, 3), ({}, 5)], rng=np.random.default_rng(0)
    )
    np.testing.assert_array_equal(got["w"], previous["w"])
