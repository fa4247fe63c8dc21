"""Incremental forward passes of one small causal LM over many requests' `KVStream`s.

`Decoder.advance(model, streams, tokens)` brings every stream up to date with its request's
tokens and leaves the next-token logits in `stream.last_logits`, feeding only tokens the
stream has not seen. Streams that need exactly one new token (the steady state of decoding)
run as one batch: their caches are left-padded to a common length and masked, with explicit
positions, so each row computes what it would alone. Streams with several new tokens (a new
request's prompt, or catching up after a reset) run one by one. The padded cache of a batched
step is kept and reused as is when the same requests step together again, so in steady
decoding only the model's own cache append copies memory.

Knows transformers' cache API, nothing about vLLM or experts.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from fedpersona.service.proxy_tuning.state import KVStream, PastKeyValues
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


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
    ) -> None:
        """Make `streams[i]` cover `tokens[i]`; afterwards `last_logits` is the next-token row."""
        if len(streams) != len(tokens):
            raise ValueError(f"{len(streams)} streams but {len(tokens)} token lists")
        single: list[tuple[KVStream, int]] = []
        for stream, toks in zip(streams, tokens, strict=True):
            if not toks:
                raise ValueError("a request with no tokens cannot be scored")
            if len(toks) < stream.length:
                stream.reset()  # the sequence shrank (never in plain decoding): start over
            new = toks[stream.length :]
            if not new:
                continue
            if len(new) == 1 and stream.past is not None:
                single.append((stream, new[0]))
            else:
                _extend(model, stream, new)
        if len(single) == 1:
            stream, token = single[0]
            _extend(model, stream, [token])
        elif single:
            self._step_batch(model, [s for s, _ in single], [t for _, t in single])

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
        self, model: torch.nn.Module, streams: Sequence[KVStream], new: Sequence[int]
    ) -> None:
        device = _device(model)
        lengths = [s.length for s in streams]
        width, padded = self._padded(model, streams)
        mask = torch.zeros(len(streams), width + 1, dtype=torch.long, device=device)
        for row, length in enumerate(lengths):
            mask[row, width - length :] = 1
        out = model(
            input_ids=torch.tensor([[t] for t in new], dtype=torch.long, device=device),
            attention_mask=mask,
            position_ids=torch.tensor([[n] for n in lengths], dtype=torch.long, device=device),
            past_key_values=_cache(padded),
            use_cache=True,
        )
        layers = _layers(out.past_key_values)
        for row, (stream, length) in enumerate(zip(streams, lengths, strict=True)):
            start = width - length
            # Views into the batched cache: no copy; the next step of the same batch reuses it.
            stream.past = tuple(
                (k[row : row + 1, :, start:], v[row : row + 1, :, start:]) for k, v in layers
            )
            stream.length += 1
            stream.last_logits = out.logits[row, -1].float()
        self._last[model] = _LastBatch(
            streams=tuple(streams),
            pasts=tuple(_past(s) for s in streams),
            width=width + 1,
            layers=layers,
        )


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _extend(model: torch.nn.Module, stream: KVStream, new: Sequence[int]) -> None:
    ids = torch.tensor([list(new)], dtype=torch.long, device=_device(model))
    out = model(
        input_ids=ids, past_key_values=_cache(stream.past), use_cache=True, logits_to_keep=1
    )
    stream.past = _layers(out.past_key_values)
    stream.length += len(new)
    stream.last_logits = out.logits[0, -1].float()


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
