"""Per-request state of proxy tuning, kept in step with vLLM's persistent batch.

vLLM identifies a request in the logits tensor only by its row (its index in the persistent
batch) and tells logits processors how rows change: requests are removed, added (possibly into
a freed row) and moved (one-way, when the batch is condensed, or swapped). `RequestTable`
mirrors that on a dict `row -> RequestState`, in vLLM's documented order (removed, added,
moved), and counts what it creates and frees so a leak is visible (`stats()`).

A `RequestState` holds, for the small base model and for the expert, a `KVStream`: the
`past_key_values` over the tokens consumed so far and the logits (or final hidden state) after
the last one, so each decoding step feeds only the new tokens. The prompt and the live output
list (a reference vLLM appends to) give the tokens.

Pure bookkeeping: no model runs here, and nothing here knows vLLM's types.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Per layer: (keys, values), each [1, kv_heads, length, head_dim].
PastKeyValues = tuple[tuple[torch.Tensor, torch.Tensor], ...]


@dataclass(eq=False)
class KVStream:
    """One small model's incremental view of one request's tokens."""

    past: PastKeyValues | None = None
    length: int = 0  # tokens consumed into `past`
    last_logits: torch.Tensor | None = None  # [vocab] after the `length`-th token
    last_hidden: torch.Tensor | None = None  # [hidden], instead of the logits (head skipped)

    def reset(self) -> None:
        self.past, self.length, self.last_logits, self.last_hidden = None, 0, None, None

    def nbytes(self) -> int:
        total = sum(_bytes(t) for t in (self.last_logits, self.last_hidden) if t is not None)
        for keys, values in self.past or ():
            total += _bytes(keys) + _bytes(values)
        return total


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass(eq=False)
class RequestState:
    """A request that uses an expert: what to add to its logits, and the caches to compute it.

    `expert_key` names the expert (the processor resolves it); `expert` holds the loaded model
    once resolved. `error` set means the expert could not be loaded for this request.
    """

    expert_key: Any
    alpha: float
    prompt: Sequence[int]
    output: Sequence[int]  # vLLM's live list: grows as tokens are sampled
    base: KVStream = field(default_factory=KVStream)
    tuned: KVStream = field(default_factory=KVStream)
    expert: Any = None
    error: str | None = None

    def tokens(self) -> list[int]:
        """Prompt plus the output so far."""
        return [*self.prompt, *self.output]

    def release(self) -> None:
        """Drop the caches and the expert reference (called when the request leaves)."""
        self.base.reset()
        self.tuned.reset()
        self.expert = None

    def nbytes(self) -> int:
        return self.base.nbytes() + self.tuned.nbytes()


@dataclass
class RequestTable:
    """`row -> RequestState` for the rows whose request uses an expert."""

    rows: dict[int, RequestState] = field(default_factory=dict)
    created: int = 0
    freed: int = 0

    def __len__(self) -> int:
        return len(self.rows)

    def update(
        self,
        *,
        batch_size: int,
        removed: Iterable[int],
        added: Iterable[tuple[int, RequestState | None]],
        moved: Iterable[tuple[int, int, bool]],
    ) -> None:
        """Apply one batch change: `removed` rows, `added` (row, state or None for a request
        without expert) and `moved` (from, to, swap) in that order."""
        for row in removed:
            self._free(row)
        for row, state in added:
            self._free(row)  # an added request may take the row of an old one
            if state is not None:
                self.rows[row] = state
                self.created += 1
        for src, dst, swap in moved:
            a, b = self.rows.pop(src, None), self.rows.pop(dst, None)
            if a is not None:
                self.rows[dst] = a
            if b is not None:
                if swap:
                    self.rows[src] = b
                else:  # a one-way move overwrites the destination's request
                    self._release(b)
        stale = [row for row in self.rows if row >= batch_size]
        if stale:
            logger.warning("dropping proxy state of rows %s beyond the batch size", stale)
            for row in stale:
                self._free(row)

    def _free(self, row: int) -> None:
        state = self.rows.pop(row, None)
        if state is not None:
            self._release(state)

    def _release(self, state: RequestState) -> None:
        state.release()
        self.freed += 1

    def stats(self) -> dict[str, int]:
        return {
            "live_requests": len(self.rows),
            "created": self.created,
            "freed": self.freed,
            "kv_bytes": sum(s.nbytes() for s in self.rows.values()),
        }
