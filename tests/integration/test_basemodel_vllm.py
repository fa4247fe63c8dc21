"""The base model as vLLM serves it: our chat template, `<|end|>` as eos, the same weights.

Uses the session's one real vLLM server (`vllm_server`, on the `micro_models` large model).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import VllmServer  # type: ignore[attr-defined]
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.vllm

MESSAGES = [{"role": "user", "content": "How should I brew coffee?"}]


def test_served_under_the_recipe_name(vllm_server: VllmServer) -> None:
    assert vllm_server.model == "fedpersona-micro-large"
    assert vllm_server.model in vllm_server.registered()


def test_vllm_renders_our_chat_template(vllm_server: VllmServer) -> None:
    tok = AutoTokenizer.from_pretrained(vllm_server.model_dir)
    ours = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    expected = len(tok(ours, add_special_tokens=False)["input_ids"])
    result = vllm_server.direct(
        {"model": vllm_server.model, "messages": MESSAGES, "max_tokens": 1, "temperature": 0}
    )
    # Same count: vLLM used the template (with its single <|bos|>) and added nothing.
    assert result["usage"]["prompt_tokens"] == expected


def test_end_token_stops_generation(vllm_server: VllmServer) -> None:
    tok = AutoTokenizer.from_pretrained(vllm_server.model_dir)
    end_id = tok.convert_tokens_to_ids("<|end|>")
    result = vllm_server.direct(
        {
            "model": vllm_server.model,
            "messages": MESSAGES,
            "max_tokens": 20,
            "temperature": 0,
            "logit_bias": {str(end_id): 100},
        }
    )
    choice = result["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == ""
    assert result["usage"]["completion_tokens"] == 1


def test_vllm_and_transformers_agree_on_the_next_token(vllm_server: VllmServer) -> None:
    tok = AutoTokenizer.from_pretrained(vllm_server.model_dir)
    model = AutoModelForCausalLM.from_pretrained(vllm_server.model_dir)
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, -1], dim=-1)
    result = vllm_server.direct(
        {
            "model": vllm_server.model,
            "messages": MESSAGES,
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 3,
            "return_tokens_as_token_ids": True,
        }
    )
    top = result["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    for entry in top:
        token_id = int(entry["token"].removeprefix("token_id:"))
        assert math.isclose(entry["logprob"], float(logprobs[token_id]), abs_tol=1e-3), entry
