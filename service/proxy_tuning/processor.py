"""The vLLM V1 logits processor of FedPT: `logits += alpha * (expert(x) - small_base(x))`.

Loaded by vLLM with `--logits-processors
fedpersona.service.proxy_tuning.processor:ProxyTuningLogitsProcessor`
(the engine supervisor adds it when `EngineSettings.proxy_small_model` is set, and passes
`FEDPERSONA_PROXY_SMALL_MODEL` and `FEDPERSONA_STORE_DIR`). Per request, the gateway sets
`vllm_xargs = {"fedpersona_expert": "<slot path>@<version id>", "fedpersona_alpha": 1.0}` (the
keys and the reference format are `fedpersona.adapters.refs`'s); requests without
`fedpersona_expert` get exactly the logits they would get without the processor.

Failure behaviour (what the gateway sees):
- A malformed expert name or alpha, or an expert that is not in the store, is invalid, or was
  trained on another base model, is refused by `validate_params` in vLLM's frontend before the
  request is scheduled: HTTP 400 with our message (an `errors.ProxyTuningError`). Only that
  request fails.
- If loading still fails inside the engine (e.g. the files vanished after validation, or the
  LoRA does not fit the small model's shapes), the request is ended at once: its row is forced
  to the end-of-sequence token, so it completes with no text (`completion_tokens == 0`); the
  error is logged and counted in `failures`. The engine and all other requests keep going.
- A small model whose tokenizer differs from the large model's stops the engine at start-up
  (`IncompatibleModels`).

The small models' logits cover the shared tokenizer's `vocab` tokens; vLLM's logits may be wider
(padding), and columns past `vocab` are left alone.

Cost per decoding step: one forward pass of the small model over 2 rows per request (its base
stream and its expert stream; experts are per-row LoRAs on the one loaded small model, see
`lora_rows.py`), with the output head skipped, then one head product on the difference of the
two final hidden states. Exact (token for token against `large + alpha * (expert - small)` up to
float rounding). `FEDPERSONA_PROXY_TOP_K=k` (off by default) is an approximation: offsets only
for the large model's k most likely tokens of each step, all other tokens masked out; greedy
output is unchanged exactly when the steered argmax lies in those k.

Debug counters: with `FEDPERSONA_PROXY_STATS_FILE` set, `stats()` is written there as JSON
after every batch change (atomically: temp file and rename), so tests can see that state is
freed when requests finish.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from fedpersona.adapters import AdapterStore
from fedpersona.adapters.manifest import model_name
from fedpersona.adapters.refs import EXPERT_ARG
from fedpersona.service.proxy_tuning.decoder import Decoder
from fedpersona.service.proxy_tuning.errors import IncompatibleModels, ProxyTuningError
from fedpersona.service.proxy_tuning.experts import (
    ExpertLibrary,
    ExpertRef,
    ExpertRequest,
    check_shared_tokenizer,
    load_small_model,
)
from fedpersona.service.proxy_tuning.settings import ProxySettings
from fedpersona.service.proxy_tuning.state import KVStream, RequestState, RequestTable
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import (
    BatchUpdate,
    LogitsProcessor,
    MoveDirectionality,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _frontend_library() -> tuple[ExpertLibrary, float]:
    """The check-only library of vLLM's frontend process (built on the first request)."""
    settings = ProxySettings()  # type: ignore[call-arg]  # fields come from the environment
    library = ExpertLibrary(
        store=AdapterStore(settings.store_dir, max_rank=settings.proxy_max_rank, read_only=True),
        base=None,
        base_name=model_name(settings.proxy_small_model),
        capacity=1,
        max_rank=settings.proxy_max_rank,
    )
    return library, settings.proxy_max_alpha


class ProxyTuningLogitsProcessor(LogitsProcessor):
    """Adds `alpha * (expert - small_base)` to the logits of requests that name an expert."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        extra = sampling_params.extra_args
        if not extra or extra.get(EXPERT_ARG) is None:
            return
        library, max_alpha = _frontend_library()
        request = ExpertRequest.from_extra_args(extra, max_alpha=max_alpha)
        if request is not None:
            library.check(request.ref)

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        settings = ProxySettings()  # type: ignore[call-arg]  # fields come from the environment
        model_config = vllm_config.model_config
        self._vocab = check_shared_tokenizer(
            large_tokenizer=model_config.tokenizer, small_model=settings.proxy_small_model
        )
        base = load_small_model(settings.proxy_small_model, device=device)
        small_vocab = int(base.config.vocab_size)
        large_vocab = int(model_config.get_vocab_size())
        if min(small_vocab, large_vocab) < self._vocab:
            raise ProxyTuningError(
                f"the tokenizer has {self._vocab} tokens but the small model's vocabulary is "
                f"{small_vocab} and the large model's {large_vocab}"
            )
        self._base = base
        head: Any = base.get_output_embeddings()
        if not isinstance(head, torch.nn.Linear) or getattr(head, "bias", None) is not None:
            raise IncompatibleModels(
                f"the small model's output head is {type(head).__name__} with a bias or not "
                "linear; proxy tuning needs a bias-free linear head"
            )
        self._head: torch.Tensor = head.weight.detach()
        self._top_k: int = settings.proxy_top_k
        self._max_alpha = settings.proxy_max_alpha
        self._library = ExpertLibrary(
            store=AdapterStore(
                settings.store_dir, max_rank=settings.proxy_max_rank, read_only=True
            ),
            base=base,
            base_name=model_name(settings.proxy_small_model),
            capacity=settings.proxy_max_experts,
            max_rank=settings.proxy_max_rank,
        )
        eos = base.config.eos_token_id  # an int, or a list whose first entry ends a turn
        self._eos: int | None = eos[0] if isinstance(eos, list) and eos else eos
        self._table = RequestTable()
        self._decoder = Decoder()
        self._failures = 0
        self._stats_file = settings.proxy_stats_file
        logger.info(
            "proxy tuning on: small model %s, store %s, vocab %d%s",
            settings.proxy_small_model,
            settings.store_dir,
            self._vocab,
            f", APPROXIMATE (top-{self._top_k} of the large model only)" if self._top_k else "",
        )
        self._write_stats()

    def is_argmax_invariant(self) -> bool:
        return False

    # ---------------------------------------------------------------------- batch bookkeeping

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        self._table.update(
            batch_size=batch_update.batch_size,
            removed=batch_update.removed,
            added=[
                (row, self._new_state(params, prompt, output))
                for row, params, prompt, output in batch_update.added
            ],
            moved=[
                (src, dst, direction == MoveDirectionality.SWAP)
                for src, dst, direction in batch_update.moved
            ],
        )
        if not self._table.rows:
            self._decoder.forget()  # the last batch's caches go with the last request
        self._write_stats()

    def _new_state(
        self, params: SamplingParams, prompt: list[int] | None, output: list[int]
    ) -> RequestState | None:
        try:
            request = ExpertRequest.from_extra_args(params.extra_args, max_alpha=self._max_alpha)
        except ProxyTuningError as e:
            # validate_params refuses these in the frontend; reaching here means a caller
            # bypassed it (e.g. the offline LLM API): end the request rather than the engine.
            return self._failed_state(str(e), prompt, output)
        if request is None:
            return None
        if prompt is None:
            return self._failed_state("proxy tuning needs the prompt's token ids", (), output)
        return RequestState(
            expert_key=request.ref, alpha=request.alpha, prompt=prompt, output=output
        )

    def _failed_state(
        self, reason: str, prompt: Sequence[int] | None, output: list[int]
    ) -> RequestState:
        state = RequestState(expert_key=None, alpha=0.0, prompt=prompt or (), output=output)
        self._fail(state, reason)
        return state

    def _fail(self, state: RequestState, reason: str) -> None:
        logger.error("proxy tuning failed for a request, ending it: %s", reason)
        state.error = reason
        state.release()
        self._failures += 1

    # ---------------------------------------------------------------------- the logits

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self._table.rows:
            return logits
        active: list[tuple[int, RequestState]] = []
        failed: list[int] = []
        for row, state in sorted(self._table.rows.items()):
            if row >= logits.shape[0]:
                continue
            if state.error is None and state.expert is None:
                self._resolve(state)
            if state.error is None:
                active.append((row, state))
            else:
                failed.append(row)
        if active:
            self._add_offsets(logits, active)
            failed += [row for row, state in active if state.error is not None]
        if failed and self._eos is not None:
            logits[failed] = float("-inf")
            logits[failed, self._eos] = 0.0
        return logits

    def _resolve(self, state: RequestState) -> None:
        ref = state.expert_key
        assert isinstance(ref, ExpertRef)
        try:
            state.expert = self._library.get(ref)
        except ProxyTuningError as e:
            self._fail(state, str(e))

    def _add_offsets(self, logits: torch.Tensor, active: list[tuple[int, RequestState]]) -> None:
        """Advance the base and the expert stream of every active request in one batch (each
        expert as a per-row LoRA on the shared small model, head skipped), then add
        `alpha * head(h_expert - h_base)` to their rows in one operation.

        `head(a) - head(b) == head(a - b)` for the bias-free linear head of these models (up to
        float rounding), so the 49k-column head runs once per request, not twice.
        """
        # Expert streams grouped by expert: each expert's rows are one contiguous slice.
        active = sorted(active, key=lambda item: (id(item[1].expert), item[0]))
        states = [state for _, state in active]
        tokens = [state.tokens() for state in states]
        try:
            self._decoder.advance(
                self._base,
                [s.base for s in states] + [s.tuned for s in states],
                tokens + tokens,
                experts=[None] * len(states) + [s.expert for s in states],
                head=False,
            )
        except RuntimeError as e:  # e.g. out of memory: these requests end, the engine stays
            for state in states:
                self._fail(state, f"the proxy forward pass failed: {e}")
            return
        diff = torch.stack([_hidden(s.tuned) - _hidden(s.base) for s in states])
        alphas = torch.tensor([s.alpha for s in states], dtype=diff.dtype).unsqueeze(1)
        index = torch.tensor([row for row, _ in active], device=logits.device)
        n = self._vocab
        if self._top_k:
            self._add_top_k(logits, index, diff, alphas)
            return
        # `head @ diff^T` rather than `diff @ head^T` (`F.linear`): with a few rows against the
        # 49k x 576 head, the latter makes the CPU GEMM pack the whole head every call (about
        # 2x slower measured here); the products are the same.
        offsets = torch.mm(self._head[:n], diff.T).T * alphas
        logits[index, :n] += offsets.to(device=logits.device, dtype=logits.dtype)

    def _add_top_k(
        self, logits: torch.Tensor, index: torch.Tensor, diff: torch.Tensor, alphas: torch.Tensor
    ) -> None:
        """The approximation (`FEDPERSONA_PROXY_TOP_K`): offsets only for the large model's
        top-k tokens of each row; every other token of the vocabulary is masked out."""
        n = self._vocab
        rows = logits[index, :n]
        top = rows.topk(min(self._top_k, n), dim=-1).indices  # [rows, k]
        picked = self._head[top.to(self._head.device)]  # [rows, k, hidden]
        offsets = torch.bmm(picked, diff.unsqueeze(-1)).squeeze(-1) * alphas
        steered = torch.full_like(rows, float("-inf"))
        steered.scatter_(1, top, rows.gather(1, top) + offsets.to(rows.device, rows.dtype))
        logits[index, :n] = steered

    # ---------------------------------------------------------------------- observability

    def stats(self) -> dict[str, int]:
        return {
            **self._table.stats(),
            "experts_cached": len(self._library),
            "expert_loads": self._library.loads,
            "failures": self._failures,
        }

    def _write_stats(self) -> None:
        if self._stats_file is None:
            return
        path = Path(self._stats_file)
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({**self.stats(), "pid": os.getpid()}, f)
            os.replace(tmp, path)
        except OSError as e:
            logger.warning("cannot write proxy stats to %s: %s", path, e)


def _hidden(stream: KVStream) -> torch.Tensor:
    if stream.last_hidden is None:
        raise RuntimeError("a stream was not advanced before its hidden state was read")
    return stream.last_hidden
