"""PerFIT pruning: exactly the budget is kept, the highest |w * g| wins, uploads round-trip."""

from __future__ import annotations

import numpy as np
import pytest
from fedpersona.trainer.errors import AggregationError, MethodError
from fedpersona.trainer.methods.pruning import (
    MASK_SUFFIX,
    apply_mask,
    budget_schedule,
    full_mask,
    kept,
    pack_sparse,
    prune_to_budget,
    taylor_importance,
    unpack_sparse,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

SHAPES = {"m.lora_A.weight": (3, 5), "m.lora_B.weight": (6, 3)}
scores_st = st.fixed_dictionaries(
    {k: arrays(np.float32, s, elements=st.floats(0, 10, width=32)) for k, s in SHAPES.items()}
)
masks_st = st.fixed_dictionaries(
    {k: arrays(np.float32, s, elements=st.sampled_from([0.0, 1.0])) for k, s in SHAPES.items()}
)


@settings(max_examples=80, deadline=None)
@given(scores_st, masks_st, st.data())
def test_prune_keeps_exactly_the_budget_of_the_best_kept_entries(scores, mask, data) -> None:  # type: ignore[no-untyped-def]
    budget = data.draw(st.integers(0, kept(mask)))
    new = prune_to_budget(scores, mask, budget)
    assert kept(new) == budget
    for key in SHAPES:
        assert set(np.unique(new[key])) <= {0.0, 1.0}
        assert np.all(new[key] <= mask[key])  # never revives a pruned entry
    kept_scores = np.concatenate([scores[k][new[k] == 1] for k in SHAPES])
    dropped = np.concatenate([scores[k][(mask[k] == 1) & (new[k] == 0)] for k in SHAPES])
    if kept_scores.size and dropped.size:
        assert kept_scores.min() >= dropped.max()


def test_prune_prefers_high_taylor_importance() -> None:
    weights = {
        "a": np.array([[1.0, -2.0, 0.5]], np.float32),
        "b": np.array([[4.0], [0.0]], np.float32),
    }
    grads = {
        "a": np.array([[0.1, 1.0, -4.0]], np.float32),
        "b": np.array([[0.01], [9.0]], np.float32),
    }
    scores = taylor_importance(weights, grads)  # a: .1 2 2, b: .04 0
    np.testing.assert_allclose(scores["a"], [[0.1, 2.0, 2.0]])
    mask = prune_to_budget(scores, full_mask(weights), 3)
    assert mask["a"].tolist() == [[1.0, 1.0, 1.0]]
    assert mask["b"].tolist() == [[0.0], [0.0]]
    # ties are broken by position (sorted key, then row-major): deterministic
    assert prune_to_budget(scores, full_mask(weights), 1)["a"].tolist() == [[0.0, 1.0, 0.0]]


def test_prune_refuses_impossible_budgets() -> None:
    scores = {"a": np.ones((2, 2), np.float32)}
    with pytest.raises(MethodError, match="cannot keep 5"):
        prune_to_budget(scores, full_mask(scores), 5)
    with pytest.raises(MethodError, match="NaN"):
        prune_to_budget({"a": np.full((2, 2), np.nan, np.float32)}, full_mask(scores), 1)


def test_budget_schedule_is_linear_monotone_and_ends_at_budget() -> None:
    assert budget_schedule(200, 100, 4) == [175, 150, 125, 100]
    assert budget_schedule(10, 3, 3)[-1] == 3
    steps = budget_schedule(1001, 7, 6)
    assert steps == sorted(steps, reverse=True) and steps[-1] == 7
    with pytest.raises(MethodError):
        budget_schedule(10, 11, 2)


@settings(max_examples=50, deadline=None)
@given(
    st.fixed_dictionaries(
        {k: arrays(np.float32, s, elements=st.floats(-5, 5, width=32)) for k, s in SHAPES.items()}
    ),
    masks_st,
)
def test_sparse_upload_round_trips(params, mask) -> None:  # type: ignore[no-untyped-def]
    upload = pack_sparse(params, mask)
    assert set(upload) == set(SHAPES) | {k + MASK_SUFFIX for k in SHAPES}
    assert sum(upload[k].size for k in SHAPES) == kept(mask)  # only kept values travel
    values, masks = unpack_sparse(upload, like=params)
    for key in SHAPES:
        np.testing.assert_array_equal(masks[key], mask[key])
        np.testing.assert_array_equal(values[key], apply_mask(params, mask)[key])


def test_unpack_refuses_uploads_that_do_not_fit() -> None:
    like = {"a": np.zeros((2, 4), np.float32)}
    upload = pack_sparse({"a": np.ones((2, 4), np.float32)}, {"a": np.ones((2, 4), np.float32)})
    with pytest.raises(AggregationError, match="keys"):
        unpack_sparse({"a": upload["a"]}, like=like)
    with pytest.raises(AggregationError, match="values for"):
        unpack_sparse({**upload, "a": upload["a"][:3]}, like=like)
    with pytest.raises(AggregationError, match="packed bits"):
        unpack_sparse({**upload, "a.mask": np.zeros(3, np.uint8)}, like=like)
