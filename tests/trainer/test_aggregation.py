"""Aggregation equals its numpy reference: np.average (FedAvg), a per-entry masked mean (PerFIT)."""

from __future__ import annotations

import numpy as np
import pytest
from fedpersona.trainer.errors import AggregationError
from fedpersona.trainer.methods.aggregation import masked_weighted_mean, weighted_mean
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

SHAPES = {"m.lora_A.weight": (2, 3), "m.lora_B.weight": (4, 2)}
finite = st.floats(-100, 100, allow_nan=False, width=32)


@st.composite
def client_results(draw: st.DrawFn, *, with_masks: bool) -> list[tuple]:
    k = draw(st.integers(1, 5))
    weights = draw(
        st.lists(st.integers(0, 50), min_size=k, max_size=k).filter(lambda w: sum(w) > 0)
    )
    results: list[tuple] = []
    for w in weights:
        values = {
            key: draw(arrays(np.float32, shape, elements=finite)) for key, shape in SHAPES.items()
        }
        if with_masks:
            masks = {
                key: draw(arrays(np.float32, shape, elements=st.sampled_from([0.0, 1.0])))
                for key, shape in SHAPES.items()
            }
            results.append((values, masks, w))
        else:
            results.append((values, w))
    return results


@settings(max_examples=60, deadline=None)
@given(client_results(with_masks=False))
def test_weighted_mean_equals_np_average(results: list[tuple]) -> None:
    out = weighted_mean(results)
    weights = [w for _, w in results]
    for key in SHAPES:
        expected = np.average(
            np.stack([p[key] for p, _ in results]).astype(np.float64), axis=0, weights=weights
        )
        np.testing.assert_allclose(out[key], expected, rtol=1e-5, atol=1e-4)
        assert out[key].dtype == np.float32


@settings(max_examples=60, deadline=None)
@given(client_results(with_masks=True), st.data())
def test_masked_mean_equals_per_entry_reference(results: list[tuple], data: st.DataObject) -> None:
    previous = {
        key: data.draw(arrays(np.float32, shape, elements=finite)) for key, shape in SHAPES.items()
    }
    out = masked_weighted_mean(previous, results)
    for key, shape in SHAPES.items():
        for index in np.ndindex(shape):
            keepers = [(v[key][index], w) for v, m, w in results if m[key][index] == 1 and w > 0]
            if keepers:
                expected = np.average([v for v, _ in keepers], weights=[w for _, w in keepers])
            else:
                expected = previous[key][index]  # nobody kept it: unchanged
            assert out[key][index] == pytest.approx(expected, rel=1e-5, abs=1e-4)


def test_masked_mean_with_full_masks_is_fedavg() -> None:
    rng = np.random.default_rng(0)
    results = [
        ({k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}, n) for n in (3, 7)
    ]
    ones = {k: np.ones(s, np.float32) for k, s in SHAPES.items()}
    previous = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    masked = masked_weighted_mean(previous, [(v, ones, n) for v, n in results])
    plain = weighted_mean(results)
    for key in SHAPES:
        np.testing.assert_allclose(masked[key], plain[key], rtol=1e-6)


def test_bad_results_are_refused() -> None:
    a = {"k": np.ones((2, 2), np.float32)}
    with pytest.raises(AggregationError, match="no client results"):
        weighted_mean([])
    with pytest.raises(AggregationError, match="0 examples"):
        weighted_mean([(a, 0), (a, 0)])
    with pytest.raises(AggregationError, match="integer >= 0"):
        weighted_mean([(a, -1)])
    with pytest.raises(AggregationError, match="shape"):
        weighted_mean([(a, 1), ({"k": np.ones((3, 2), np.float32)}, 1)])
    with pytest.raises(AggregationError, match="keys differ"):
        weighted_mean([(a, 1), ({"j": np.ones((2, 2), np.float32)}, 1)])
    with pytest.raises(AggregationError, match="NaN"):
        weighted_mean([(a, 1), ({"k": np.full((2, 2), np.nan, np.float32)}, 1)])
    with pytest.raises(AggregationError, match="other than 0 and 1"):
        masked_weighted_mean(a, [(a, {"k": np.full((2, 2), 0.5, np.float32)}, 1)])
