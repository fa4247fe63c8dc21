"""Sparse exchange of a LoRA by module: which modules a client shares, and their mean.

A LoRA *module* is one target projection of one layer (its A and B together), named by the PEFT
key prefix before `.lora_A` / `.lora_B`. `top_modules` keeps the most important fraction of them
(PFIT scores them by policy-gradient norm); `sparse_mean` averages each key over the clients that
uploaded it, weighted by examples, and keeps the previous value where nobody did. Pure numpy.
"""

from __future__ import annotations

import math

import numpy as np
from fedpersona.trainer.errors import AggregationError

Params = dict[str, np.ndarray]


def module_of(key: str) -> str:
    """'<module>.lora_A.weight' -> '<module>' (a LoRA module is its A and B together)."""
    return key.rsplit(".lora_", 1)[0]


def top_modules(importance: dict[str, float], fraction: float) -> frozenset[str]:
    """The `ceil(fraction * n)` most important modules (ties broken by name)."""
    if not importance:
        return frozenset()
    count = max(1, min(len(importance), math.ceil(fraction * len(importance) - 1e-9)))
    ranked = sorted(importance, key=lambda m: (-importance[m], m))
    return frozenset(ranked[:count])


def sparse_mean(previous: Params, results: list[tuple[Params, int]]) -> Params:
    """Per key, the example-weighted mean over the clients that uploaded it; else `previous`."""
    out: Params = {}
    for i, (upload, _) in enumerate(results):
        unknown = set(upload) - set(previous)
        if unknown:
            raise AggregationError(
                f"upload {i}: keys the global does not have: {sorted(unknown)[:3]}"
            )
        for key, value in upload.items():
            if np.shape(value) != np.shape(previous[key]):
                raise AggregationError(f"upload {i}: {key!r} has another shape than the global")
            if not np.all(np.isfinite(value)):
                raise AggregationError(f"upload {i}: {key!r} contains NaN or Inf")
    for key, value in previous.items():
        senders = [(np.asarray(u[key], np.float64), n) for u, n in results if key in u]
        total = sum(n for _, n in senders)
        if not senders or total <= 0:
            out[key] = np.array(value, dtype=np.float32, copy=True)
            continue
        mean = sum(v * (n / total) for v, n in senders)
        out[key] = np.asarray(mean, dtype=np.float32)
    return out
