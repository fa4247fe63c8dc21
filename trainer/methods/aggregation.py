"""Server-side aggregation of client parameters: pure numpy, no torch, no I/O, no Flower.

- `weighted_mean`: FedAvg. Every key is the example-weighted mean over all clients.
- `masked_weighted_mean`: PerFIT's parameter-wise aggregation. Each *entry* is the
  example-weighted mean over the clients whose mask keeps it; an entry no client kept keeps its
  value from `previous` (it is nobody's parameter this round, so nothing should move it).

Means are accumulated in float64 and returned as float32. Results are checked strictly: every
client must send the same keys with the same shapes, weights must be non-negative integers with
a positive total, and values must be finite; otherwise `AggregationError` names the problem.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from fedpersona.trainer.errors import AggregationError

Params = dict[str, np.ndarray]


def _check_weights(weights: Sequence[int]) -> None:
    if not weights:
        raise AggregationError("no client results to aggregate")
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, int | np.integer) or w < 0:
            raise AggregationError(f"result {i}: example count must be an integer >= 0, got {w!r}")
    if sum(int(w) for w in weights) == 0:
        raise AggregationError("every client reported 0 examples; nothing to weight by")


def _check_same_structure(results: Sequence[Mapping[str, np.ndarray]], *, what: str) -> None:
    reference = results[0]
    for i, params in enumerate(results):
        if set(params) != set(reference):
            diff = sorted(set(params) ^ set(reference))
            raise AggregationError(f"{what} {i}: keys differ from {what} 0 (e.g. {diff[:3]})")
        for key, value in params.items():
            if np.shape(value) != np.shape(reference[key]):
                raise AggregationError(
                    f"{what} {i}: {key!r} has shape {np.shape(value)}, "
                    f"{what} 0 has {np.shape(reference[key])}"
                )
            if not np.all(np.isfinite(value)):
                raise AggregationError(f"{what} {i}: {key!r} contains NaN or Inf")


def weighted_mean(results: Sequence[tuple[Mapping[str, np.ndarray], int]]) -> Params:
    """FedAvg: `sum_i n_i * w_i / sum_i n_i` for every key."""
    weights = [n for _, n in results]
    _check_weights(weights)
    params = [p for p, _ in results]
    _check_same_structure(params, what="result")
    total = float(sum(int(w) for w in weights))
    out: Params = {}
    for key in sorted(params[0]):
        acc = np.zeros(np.shape(params[0][key]), dtype=np.float64)
        for p, w in zip(params, weights, strict=True):
            acc += float(w) * np.asarray(p[key], dtype=np.float64)
        out[key] = (acc / total).astype(np.float32)
    return out


def masked_weighted_mean(
    previous: Mapping[str, np.ndarray],
    results: Sequence[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray], int]],
) -> Params:
    """Parameter-wise mean over the clients that keep each entry (PerFIT).

    `results` holds `(values, mask, n)` per client with dense `values` and 0/1 `mask` arrays
    shaped like `previous`. Entry e of key k becomes
    `sum_i n_i m_i[e] w_i[e] / sum_i n_i m_i[e]` where that denominator is positive, and
    `previous[k][e]` where it is 0 (no client with examples kept e).
    """
    weights = [n for _, _, n in results]
    _check_weights(weights)
    values = [v for v, _, _ in results]
    masks = [m for _, m, _ in results]
    _check_same_structure([dict(previous), *values], what="params")
    _check_same_structure([dict(previous), *masks], what="mask")
    for i, mask in enumerate(masks):
        for key, entries in mask.items():
            if not np.all((np.asarray(entries) == 0) | (np.asarray(entries) == 1)):
                raise AggregationError(f"mask {i}: {key!r} has entries other than 0 and 1")
    out: Params = {}
    for key in sorted(previous):
        num = np.zeros(np.shape(previous[key]), dtype=np.float64)
        den = np.zeros_like(num)
        for v, m, w in zip(values, masks, weights, strict=True):
            kept = float(w) * np.asarray(m[key], dtype=np.float64)
            num += kept * np.asarray(v[key], dtype=np.float64)
            den += kept
        prev = np.asarray(previous[key], dtype=np.float64)
        mean = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
        out[key] = np.where(den > 0, mean, prev).astype(np.float32)
    return out
