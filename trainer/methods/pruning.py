"""PerFIT's sparse LoRA architectures: Taylor importance, budgeted pruning and sparse uploads.

Pure numpy on `Params` (key -> array) and masks of the same shapes (float32 0/1); no torch, no
I/O. The pieces:

- `taylor_importance(w, g) = |w * g|`, the first-order estimate of how much the loss changes
  when an entry is zeroed (accumulate it over a few batches before pruning);
- `prune_to_budget` keeps exactly `budget` entries: the highest scores among the entries the
  current mask still keeps, ranked across *all* keys together (so a module may end up with more
  or fewer entries than another); equal scores are broken by position (sorted key, then
  row-major index), which makes the result deterministic;
- `budget_schedule` spreads the pruning from the expanded size down to the budget over a few
  iterations (iterative pruning);
- `pack_sparse` / `unpack_sparse`: what a PerFIT client uploads: for every key the kept values
  in row-major order (float32, 1-D) and `<key>.mask`, the mask bit-packed (uint8), so the
  uplink is the budget's values plus one bit per expanded entry.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from fedpersona.trainer.errors import AggregationError, MethodError

Params = dict[str, np.ndarray]
MASK_SUFFIX = ".mask"


def taylor_importance(weights: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> Params:
    """`|w * dL/dw|` for every entry."""
    if set(weights) != set(grads):
        raise MethodError("weights and gradients have different keys")
    return {
        key: np.abs(np.asarray(weights[key], np.float32) * np.asarray(grads[key], np.float32))
        for key in sorted(weights)
    }


def full_mask(params: Mapping[str, np.ndarray]) -> Params:
    """A mask that keeps every entry."""
    return {key: np.ones(np.shape(value), dtype=np.float32) for key, value in params.items()}


def kept(mask: Mapping[str, np.ndarray]) -> int:
    """How many entries `mask` keeps."""
    return int(sum(int(np.count_nonzero(m)) for m in mask.values()))


def prune_to_budget(
    scores: Mapping[str, np.ndarray], mask: Mapping[str, np.ndarray], budget: int
) -> Params:
    """The mask keeping exactly `budget` entries: the best-scoring ones that `mask` keeps."""
    if set(scores) != set(mask):
        raise MethodError("scores and mask have different keys")
    available = kept(mask)
    if not 0 <= budget <= available:
        raise MethodError(f"cannot keep {budget} entries: the mask keeps {available}")
    keys = sorted(scores)
    flat_scores = []
    for key in keys:
        s = np.asarray(scores[key], dtype=np.float64).ravel()
        if np.shape(scores[key]) != np.shape(mask[key]):
            raise MethodError(f"{key!r}: score shape {np.shape(scores[key])} != mask shape")
        if not np.all(np.isfinite(s)):
            raise MethodError(f"{key!r}: importance scores contain NaN or Inf")
        # Entries already pruned rank below every kept one.
        flat_scores.append(np.where(np.asarray(mask[key]).ravel() > 0, s, -np.inf))
    flat = np.concatenate(flat_scores)
    order = np.argsort(-flat, kind="stable")  # stable: ties keep positional order
    keep = np.zeros(flat.shape, dtype=np.float32)
    keep[order[:budget]] = 1.0
    out: Params = {}
    offset = 0
    for key in keys:
        size = int(np.size(scores[key]))
        out[key] = keep[offset : offset + size].reshape(np.shape(scores[key]))
        offset += size
    return out


def budget_schedule(start: int, budget: int, iterations: int) -> list[int]:
    """Kept-entry counts after each of `iterations` pruning steps, linear from `start` to `budget`.

    The last value is exactly `budget`; values never increase.
    """
    if iterations < 1:
        raise MethodError(f"pruning needs at least one iteration, got {iterations}")
    if not 0 <= budget <= start:
        raise MethodError(f"budget {budget} must lie between 0 and the start size {start}")
    return [start - (start - budget) * k // iterations for k in range(1, iterations + 1)]


def apply_mask(params: Mapping[str, np.ndarray], mask: Mapping[str, np.ndarray]) -> Params:
    """`params` with the pruned entries zeroed."""
    if set(params) != set(mask):
        raise MethodError("params and mask have different keys")
    return {
        key: (np.asarray(params[key], np.float32) * np.asarray(mask[key], np.float32)).astype(
            np.float32
        )
        for key in sorted(params)
    }


def pack_sparse(params: Mapping[str, np.ndarray], mask: Mapping[str, np.ndarray]) -> Params:
    """The upload of a sparse LoRA: kept values (1-D float32) and `<key>.mask` packed bits."""
    if set(params) != set(mask):
        raise MethodError("params and mask have different keys")
    out: Params = {}
    for key in sorted(params):
        keep = np.asarray(mask[key]).ravel() > 0
        out[key] = np.asarray(params[key], np.float32).ravel()[keep].copy()
        out[key + MASK_SUFFIX] = np.packbits(keep)
    return out


def unpack_sparse(
    upload: Mapping[str, np.ndarray], like: Mapping[str, np.ndarray]
) -> tuple[Params, Params]:
    """Dense (values, mask) from a `pack_sparse` upload, shaped like `like` (the global params).

    Raises `AggregationError` when the upload does not fit `like`.
    """
    expected = {k for k in like} | {k + MASK_SUFFIX for k in like}
    if set(upload) != expected:
        diff = sorted(set(upload) ^ expected)
        raise AggregationError(f"sparse upload keys do not match the global LoRA (e.g. {diff[:3]})")
    values: Params = {}
    masks: Params = {}
    for key in sorted(like):
        shape = np.shape(like[key])
        size = int(np.prod(shape))
        packed = np.asarray(upload[key + MASK_SUFFIX])
        if packed.dtype != np.uint8 or packed.ndim != 1 or packed.size != (size + 7) // 8:
            raise AggregationError(f"{key!r}: mask is not {size} packed bits")
        keep = np.unpackbits(packed, count=size).astype(bool)
        kept_values = np.asarray(upload[key], dtype=np.float32)
        if kept_values.shape != (int(keep.sum()),):
            raise AggregationError(
                f"{key!r}: {kept_values.size} values for {int(keep.sum())} kept entries"
            )
        dense = np.zeros(size, dtype=np.float32)
        dense[keep] = kept_values
        values[key] = dense.reshape(shape)
        masks[key] = keep.astype(np.float32).reshape(shape)
    return values, masks
