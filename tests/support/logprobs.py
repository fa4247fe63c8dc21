"""Greedy continuations with log-probabilities from a real vLLM server, and the transformers
reference for the same tokens: how the integration tests check that vLLM serves an adapter
exactly (`max |dlogprob|` between the two)."""

from __future__ import annotations

from typing import Any, Protocol

import httpx
import torch


class Engine(Protocol):
    base_url: str

    @property
    def headers(self) -> dict[str, str]: ...


def complete(
    server: Engine, model: str, prompt_ids: list[int], *, new_tokens: int = 8
) -> tuple[list[int], list[float]]:
    """Greedy continuation of `prompt_ids` by `model` (a served name): token ids and logprobs."""
    response = httpx.post(
        f"{server.base_url}/v1/completions",
        json={
            "model": model,
            "prompt": prompt_ids,
            "max_tokens": new_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "logprobs": 1,
            "return_tokens_as_token_ids": True,
        },
        headers=server.headers,
        timeout=120,
    )
    response.raise_for_status()
    logprobs: dict[str, Any] = response.json()["choices"][0]["logprobs"]
    tokens = [int(t.removeprefix("token_id:")) for t in logprobs["tokens"]]
    return tokens, [float(x) for x in logprobs["token_logprobs"]]


def reference_logprobs(
    model: torch.nn.Module, prompt: list[int], tokens: list[int]
) -> torch.Tensor:
    """Teacher-forced log-probabilities transformers gives `tokens` after `prompt`."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
    logprobs = torch.log_softmax(logits, dim=-1)
    return logprobs[torch.arange(len(tokens)), torch.tensor(tokens)]
