"""Robust and private aggregation of a method's shared part: pure numpy, no I/O, no Flower.

Building blocks, each on client *updates* (`upload - previous global`, float64):

- `clip_update`: scale an update down to an L2 norm of at most `max_norm` (over all its keys).
- `coordinate_median`, `trimmed_mean`: per coordinate, over clients (unweighted: a robust
  statistic must not let a client's self-reported example count buy it weight).
- `krum_scores`, `multi_krum`: Krum (Blanchard et al., 2017): a client's score is the sum of
  squared distances to its `n - f - 2` nearest neighbours; Multi-Krum keeps the `m` best.
- `gaussian_noise`: the Gaussian mechanism's noise for central DP.

`AggregationRule` composes them around a `Method`'s own aggregation, so every method with a dense
shared part (FedAvg, FedProx, PFTT's global LoRA, FedPT's small-model LoRA) gets the same options:
clip first, then either the method's mean over the kept clients (mean, krum, multi-krum), the
median or the trimmed mean of the updates, then DP noise. A sparse shared part (PerFIT's packed
masked LoRA) only takes the plain mean; other rules raise `AggregationError`. The per-user
personal parts never reach this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from fedpersona.trainer.errors import AggregationError

if TYPE_CHECKING:
    from fedpersona.trainer.methods.base import Method

Params = dict[str, np.ndarray]
RULES = ("mean", "median", "trimmed-mean", "krum", "multi-krum")


def _check(updates: Sequence[Params]) -> list[str]:
    if not updates:
        raise AggregationError("no client updates to aggregate")
    keys = sorted(updates[0])
    for i, u in enumerate(updates):
        if sorted(u) != keys:
            raise AggregationError(f"update {i}: keys differ from update 0")
        for k in keys:
            if np.shape(u[k]) != np.shape(updates[0][k]):
                raise AggregationError(f"update {i}: {k!r} has another shape than update 0")
            if not np.all(np.isfinite(u[k])):
                raise AggregationError(f"update {i}: {k!r} contains NaN or Inf")
    return keys


def update_norm(update: Params) -> float:
    """The L2 norm of all of an update's entries together."""
    return float(np.sqrt(sum(np.sum(np.square(v, dtype=np.float64)) for v in update.values())))


def clip_update(update: Params, max_norm: float) -> Params:
    """`update * min(1, max_norm / ||update||)`."""
    if not max_norm > 0:
        raise AggregationError(f"clip norm must be positive, got {max_norm!r}")
    norm = update_norm(update)
    scale = 1.0 if norm <= max_norm else max_norm / norm
    return {k: np.asarray(v, dtype=np.float64) * scale for k, v in update.items()}


def coordinate_median(updates: Sequence[Params]) -> Params:
    keys = _check(updates)
    return {
        k: np.median(np.stack([u[k] for u in updates]).astype(np.float64), axis=0) for k in keys
    }


def trimmed_mean(updates: Sequence[Params], fraction: float) -> Params:
    """Per coordinate, the mean after dropping the `floor(fraction * n)` lowest and highest."""
    keys = _check(updates)
    if not 0 <= fraction < 0.5:
        raise AggregationError(f"trim fraction must be in [0, 0.5), got {fraction!r}")
    n = len(updates)
    cut = int(fraction * n)
    out: Params = {}
    for k in keys:
        stacked = np.sort(np.stack([u[k] for u in updates]).astype(np.float64), axis=0)
        out[k] = stacked[cut : n - cut].mean(axis=0)
    return out


def _flat(update: Params, keys: list[str]) -> np.ndarray:
    return np.concatenate([np.ravel(update[k]).astype(np.float64) for k in keys])


def krum_scores(updates: Sequence[Params], byzantine: int) -> np.ndarray:
    """Each client's sum of squared distances to its `max(1, n - f - 2)` nearest others."""
    keys = _check(updates)
    if byzantine < 0:
        raise AggregationError(f"byzantine must be >= 0, got {byzantine}")
    flat = np.stack([_flat(u, keys) for u in updates])
    sq = np.square(flat).sum(axis=1)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2.0 * flat @ flat.T, 0.0)
    n = len(updates)
    closest = max(1, n - byzantine - 2)
    scores = np.empty(n)
    for i in range(n):
        others = np.delete(dist[i], i)
        scores[i] = np.sort(others)[:closest].sum() if n > 1 else 0.0
    return scores


def multi_krum(updates: Sequence[Params], *, byzantine: int, keep: int) -> list[int]:
    """The indices of the `keep` clients with the lowest Krum scores (ties: lower index)."""
    if not 1 <= keep <= len(updates):
        raise AggregationError(f"multi-krum keeps 1..{len(updates)} clients, not {keep}")
    scores = krum_scores(updates, byzantine)
    return sorted(int(i) for i in np.argsort(scores, kind="stable")[:keep])


def gaussian_noise(like: Params, std: float, rng: np.random.Generator) -> Params:
    return {k: rng.normal(0.0, std, size=np.shape(v)) for k, v in like.items()}


@dataclass(frozen=True)
class AggregationRule:
    """How the server turns the round's uploads into the next global (see the module doc)."""

    name: str = "mean"
    trim_fraction: float = 0.1
    byzantine: int = 1
    clip_norm: float = 0.0
    dp_noise: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in RULES:
            raise AggregationError(f"unknown aggregation {self.name!r}; one of {RULES}")
        if self.dp_noise > 0 and (self.clip_norm <= 0 or self.name != "mean"):
            raise AggregationError("DP noise needs aggregation 'mean' and a clip norm")

    @property
    def plain(self) -> bool:
        return self.name == "mean" and self.clip_norm <= 0 and self.dp_noise <= 0

    def aggregate(
        self,
        method: Method,
        *,
        previous: Params,
        results: list[tuple[Params, int]],
        rng: np.random.Generator | None = None,
    ) -> Params:
        # No upload at all (PFTT's personalization round shares nothing): nothing to clip or
        # noise; the method keeps its global.
        if self.plain or (results and all(not upload for upload, _ in results)):
            return method.aggregate(previous=previous, results=results)
        if not results:
            raise AggregationError("no client results to aggregate")
        for i, (upload, _) in enumerate(results):
            same = set(upload) == set(previous) and all(
                np.shape(upload[k]) == np.shape(previous[k]) for k in previous
            )
            if not same:
                raise AggregationError(
                    f"aggregation {self.name!r} / clipping need uploads shaped like the global "
                    f"(upload {i} is not: {method.name} shares a sparse or different part)"
                )
        updates = [
            {k: np.asarray(u[k], dtype=np.float64) - np.asarray(previous[k], np.float64) for k in u}
            for u, _ in results
        ]
        if self.clip_norm > 0:
            updates = [clip_update(u, self.clip_norm) for u in updates]
        if self.name in ("median", "trimmed-mean"):
            combined = (
                coordinate_median(updates)
                if self.name == "median"
                else trimmed_mean(updates, self.trim_fraction)
            )
            return _apply(previous, combined)
        if self.dp_noise > 0:
            # Central DP: an unweighted mean of clipped updates has sensitivity clip_norm / n.
            mean = {k: np.mean([u[k] for u in updates], axis=0) for k in updates[0]}
            std = self.dp_noise * self.clip_norm / len(updates)
            noise = gaussian_noise(mean, std, rng or np.random.default_rng())
            return _apply(previous, {k: mean[k] + noise[k] for k in mean})
        kept = list(range(len(results)))
        if self.name in ("krum", "multi-krum"):
            keep = 1 if self.name == "krum" else max(1, len(results) - self.byzantine)
            kept = multi_krum(updates, byzantine=self.byzantine, keep=keep)
        clipped = [
            (_apply(previous, updates[i]), results[i][1]) for i in kept
        ]  # uploads rebuilt from (clipped) updates
        return method.aggregate(previous=previous, results=clipped)


def _apply(previous: Params, update: Params) -> Params:
    return {
        k: (np.asarray(previous[k], np.float64) + update[k]).astype(np.float32) for k in previous
    }
