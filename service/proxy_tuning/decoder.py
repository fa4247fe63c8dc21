"""Incremental forward passes of one small causal LM over many requests' `KVStream`s.

`Decoder.advance(model, streams, tokens)` brings every stream up to date with its request's
tokens and leaves the next-token logits in `stream.last_logits`, feeding only tokens the
stream has not seen. With `experts`, stream `i` runs the small model plus LoRA `experts[i]`
(`lora_rows.routed`; `None` = the plain model), so base and expert streams share one batch; with
`head=False` the output head is skipped and `stream.last_hidden` (the final normed hidden state)
is left instead, for a caller that applies the head itself (to a difference of two streams).

Streams that need exactly one new token (the steady state of decoding) run as one batch: their
caches are left-padded to a common length and masked, with explicit positions, so each row
computes what it would alone. Fresh streams with the same number of new tokens (a new request's
prompt, for its base and its expert stream) run as one unpadded batch; the rest (catching up
after a reset) run one by one. The padded cache of a batched step is kept and reused as is when
the same streams step together again, so in steady decoding only the model's own cache append
copies memory.

Knows transformers' cache API, nothing about vLLM or where experts come from.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from fedpersona.service.proxy_tuning.lora_rows import ExpertWeights, routed
from fedpersona.service.proxy_tuning.state import KVStream, PastKeyValues
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

Experts = Sequence[ExpertWeights | None]


@dataclass(eq=False)
class _LastBatch:
    """The padded cache a batched step produced, reusable by the next step of the same batch."""

    streams: tuple[KVStream, ...]
    pasts: tuple[PastKeyValues, ...]  # what each stream held afterwards (identity checked)
    width: int  # padded length of `layers`
    layers: PastKeyValues


class Decoder:
    """Runs small models incrementally; remembers each model's last batched step.

    In steady decoding the same requests advance together step after step; their padded
    batched cache from the previous step is then exactly the next step's input, so it is reused
    instead of being rebuilt from the per-request caches (which are views into it).
    """

    def __init__(self) -> None:
        self._last: weakref.WeakKeyDictionary[torch.nn.Module, _LastBatch] = (
            weakref.WeakKeyDictionary()
        )

    def forget(self) -> None:
        """Drop the remembered batches (e.g. when no request is left)."""
        self._last.clear()

    @torch.inference_mode()
    def advance(
        self,
        model: torch.nn.Module,
        streams: Sequence[KVStream],
        tokens: Sequence[Sequence[int]],
        *,
        experts: Experts | None = None,
        head: bool = True,
    ) -> None:
        """Make `streams[i]` cover `tokens[i]` (with LoRA `experts[i]` if given); afterwards
        `last_logits` (or with `head=False`, `last_hidden`) is the next-token row."""
        if len(streams) != len(tokens) or (experts is not None and len(experts) != len(streams)):
            raise ValueError(f"{len(streams)} streams but {len(tokens)} token lists / experts")
        lora = list(experts) if experts is not None else [None] * len(streams)
        single: list[int] = []
        fresh: dict[int, list[int]] = {}
        for i, (stream, toks) in enumerate(zip(streams, tokens, strict=True)):
            if not toks:
                raise ValueError("a request with no tokens cannot be scored")
            if len(toks) < stream.length:
                stream.reset()  # the sequence shrank (never in plain decoding): start over
            new = len(toks) - stream.length
            if new == 0:
                continue
            if new == 1 and stream.past is not None:
                single.append(i)
            elif stream.past is None:
                fresh.setdefault(new, []).append(i)
            else:
                _run(model, [stream], [list(toks[stream.length :])], [lora[i]], head=head)
        for members in fresh.values():
            _run(
                model,
                [streams[i] for i in members],
                [list(tokens[i]) for i in members],
                [lora[i] for i in members],
                head=head,
            )
        if len(single) == 1:
            i = single[0]
            _run(model, [streams[i]], [[tokens[i][-1]]], [lora[i]], head=head)
        elif single:
            self._step_batch(
                model,
                [streams[i] for i in single],
                [tokens[i][-1] for i in single],
                [lora[i] for i in single],
                head=head,
            )

    def _padded(
        self, model: torch.nn.Module, streams: Sequence[KVStream]
    ) -> tuple[int, PastKeyValues]:
        last = self._last.get(model)
        if (
            last is not None
            and len(last.streams) == len(streams)
            and all(a is b for a, b in zip(last.streams, streams, strict=True))
            and all(s.past is p for s, p in zip(streams, last.pasts, strict=True))
        ):
            return last.width, last.layers
        width = max(s.length for s in streams)
        n_layers = len(_past(streams[0]))
        padded = []
        for layer in range(n_layers):
            keys = torch.cat([_left_pad(_past(s)[layer][0], width) for s in streams])
            values = torch.cat([_left_pad(_past(s)[layer][1], width) for s in streams])
            padded.append((keys, values))
        return width, tuple(padded)

    def _step_batch(
        self,
        model: torch.nn.Module,
        streams: Sequence[KVStream],
        new: Sequence[int],
        experts: Experts,
        *,
        head: bool,
    ) -> None:
        device = _device(model)
        lengths = [s.length for s in streams]
        width, padded = self._padded(model, streams)
        if all(n == width for n in lengths):
            mask = None  # nothing padded: every row attends to its whole cache
        else:
            mask = torch.zeros(len(streams), width + 1, dtype=torch.long, device=device)
            for row, length in enumerate(lengths):
                mask[row, width - length :] = 1
        out, layers = _forward(
            model,
            experts,
            head=head,
            input_ids=torch.tensor([[t] for t in new], dtype=torch.long, device=device),
            attention_mask=mask,
            position_ids=torch.tensor([[n] for n in lengths], dtype=torch.long, device=device),
            past_key_values=_cache(padded),
        )
        for row, (stream, length) in enumerate(zip(streams, lengths, strict=True)):
            start = width - length
            # Views into the batched cache: no copy; the next step of the same batch reuses it.
            stream.past = tuple(
                (k[row : row + 1, :, start:], v[row : row + 1, :, start:]) for k, v in layers
            )
            stream.length += 1
            _set_last(stream, out[row], head=head)
        self._last[model] = _LastBatch(
            streams=tuple(streams),
            pasts=tuple(_past(s) for s in streams),
            width=width + 1,
            layers=layers,
        )


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _forward(
    model: torch.nn.Module, experts: Experts, *, head: bool, **kw: Any
) -> tuple[torch.Tensor, PastKeyValues]:
    """One forward pass: (the last position's logits or final hidden state per row, the cache)."""
    context = routed(model, experts) if any(e is not None for e in experts) else nullcontext()
    with context:
        if head:
            out = model(**kw, use_cache=True, logits_to_keep=1)
            return out.logits[:, -1], _layers(out.past_key_values)
        body = model.get_decoder()  # type: ignore[operator]
        out = body(**kw, use_cache=True)
        return out.last_hidden_state[:, -1], _layers(out.past_key_values)


def _set_last(stream: KVStream, row: torch.Tensor, *, head: bool) -> None:
    if head:
        stream.last_logits, stream.last_hidden = row.float(), None
    else:
        stream.last_logits, stream.last_hidden = None, row


def _run(
    model: torch.nn.Module,
    streams: Sequence[KVStream],
    new: Sequence[Sequence[int]],
    experts: Experts,
    *,
    head: bool,
) -> None:
    """Extend streams that all hold the same cache length by the same number of tokens, as one
    unpadded batch (a single stream, or fresh streams with equally long prompts)."""
    past = _past(streams[0]) if len(streams) == 1 and streams[0].past is not None else None
    out, layers = _forward(
        model,
        experts,
        head=head,
        input_ids=torch.tensor([list(t) for t in new], dtype=torch.long, device=_device(model)),
        past_key_values=_cache(past),
    )
    for row, stream in enumerate(streams):
        stream.past = tuple((k[row : row + 1], v[row : row + 1]) for k, v in layers)
        stream.length += len(new[row])
        _set_last(stream, out[row], head=head)


def _cache(past: PastKeyValues | None) -> DynamicCache:
    """A transformers cache over `past` without copying it (its constructor would)."""
    cache = DynamicCache()
    for keys, values in past or ():
        layer = DynamicLayer()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        cache.layers.append(layer)
    return cache


def _past(stream: KVStream) -> PastKeyValues:
    if stream.past is None:
        raise RuntimeError("a batched step needs a stream that has already been prefilled")
    return stream.past


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - t.shape[-2]
    if missing == 0:
        return t
    pad = t.new_zeros((*t.shape[:-2], missing, t.shape[-1]))
    return torch.cat([pad, t], dim=-2)


def _layers(cache: DynamicCache) -> PastKeyValues:
    layers = []
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
            raise TypeError(f"unsupported cache layer {type(layer).__name__}: not key/value")
        layers.append((keys, values))
    return tuple(layers)
