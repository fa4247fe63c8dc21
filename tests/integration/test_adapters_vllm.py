"""The adapter store's promises, checked against the real vLLM server of the session.

- A composed adapter (`compose(global, personal)`, published through the store) is served by
  vLLM exactly as PEFT serves the global and personal adapters applied together.
- `validate_adapter_dir` refuses what vLLM refuses (DoRA, bias, modules_to_save, rank above
  `--max-lora-rank`) and accepts what it accepts (a plain LoRA at the maximum rank).

Adapters are registered under names unique to this module and unloaded afterwards, so the
shared server's other tests do not see them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from conftest import VllmServer
from fedpersona.adapters import (
    AdapterStore,
    InvalidAdapter,
    Slot,
    compose,
    save_lora,
    validate_adapter_dir,
)
from peft import LoraConfig, PeftModel, get_peft_model
from support.logprobs import complete, reference_logprobs
from support.lora import strong_lora
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.vllm

MAX_RANK = 16  # the shared server's --max-lora-rank
PROMPT = "To be, or not to be, that is the question"
NEW_TOKENS = 8
# vLLM (CPU, float32, its own LoRA kernels) against transformers + PEFT, in log-probability.
LOGPROB_TOLERANCE = 1e-4  # measured: 4.8e-07


class Loader:
    """Registers adapters in vLLM under unique names and unloads them all at the end."""

    def __init__(self, server: VllmServer) -> None:
        self.server = server
        self.loaded: list[str] = []

    def load(self, path: Path) -> httpx.Response:
        name = f"adapters-test-{uuid.uuid4().hex[:10]}"
        response = httpx.post(
            f"{self.server.base_url}/v1/load_lora_adapter",
            json={"lora_name": name, "lora_path": str(path)},
            headers=self.server.headers,
            timeout=120,
        )
        if response.status_code == 200:
            self.loaded.append(name)
        return response

    def close(self) -> None:
        for name in self.loaded:
            httpx.post(
                f"{self.server.base_url}/v1/unload_lora_adapter",
                json={"lora_name": name},
                headers=self.server.headers,
                timeout=60,
            )


@pytest.fixture
def loader(vllm_server: VllmServer) -> Iterator[Loader]:
    loader = Loader(vllm_server)
    try:
        yield loader
    finally:
        loader.close()


def test_composed_adapter_served_by_vllm_equals_global_plus_personal_in_peft(
    vllm_server: VllmServer, loader: Loader, tmp_path: Path
) -> None:
    model_dir, base = vllm_server.model_dir, vllm_server.model
    g = strong_lora(
        model_dir, base, seed=1, r=4, targets=("q_proj", "v_proj", "down_proj"), scale=0.3
    )
    p = strong_lora(
        model_dir, base, seed=2, r=8, targets=("v_proj", "o_proj", "up_proj"), scale=0.3
    )
    store = AdapterStore(tmp_path / "store", max_rank=MAX_RANK)
    served = store.publish_lora(Slot.user_served("alice"), compose(g, p), metadata={"round": 1})
    assert served.rank == 12
    response = loader.load(served.path)
    assert response.status_code == 200, response.text

    prompt = AutoTokenizer.from_pretrained(model_dir)(PROMPT)["input_ids"]
    tokens, vllm_logprobs = complete(vllm_server, loader.loaded[-1], prompt, new_tokens=NEW_TOKENS)

    save_lora(g, tmp_path / "global")
    save_lora(p, tmp_path / "personal")
    both: Any = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "global", adapter_name="g"
    )
    both.load_adapter(tmp_path / "personal", adapter_name="p")
    both.base_model.set_adapter(["g", "p"])
    want = reference_logprobs(both.eval(), prompt, tokens)
    got = torch.tensor(vllm_logprobs)
    # greedy: every token vLLM chose is also transformers' argmax, with the same logprob
    diff = (got - want).abs().max().item()
    print(f"\ncomposed adapter: vLLM vs PEFT(global+personal) max |dlogprob| = {diff:.2e}")
    assert diff < LOGPROB_TOLERANCE
    base_model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert (reference_logprobs(base_model, prompt, tokens) - want).abs().max().item() > 0.05


def peft_dir(server: VllmServer, tmp_path: Path, name: str, **config: Any) -> Path:
    model = AutoModelForCausalLM.from_pretrained(server.model_dir)
    model.name_or_path = server.model  # PEFT records this as base_model_name_or_path
    lora = LoraConfig(target_modules=["q_proj", "v_proj"], lora_alpha=16, **config)
    out = tmp_path / name
    get_peft_model(model, lora).save_pretrained(str(out), save_embedding_layers=False)
    return out


@pytest.mark.parametrize(
    "config",
    [
        {"r": 4, "use_dora": True},
        {"r": 4, "bias": "lora_only"},
        {"r": 4, "modules_to_save": ["lm_head"]},
        {"r": 2 * MAX_RANK},
    ],
    ids=["dora", "bias", "modules_to_save", "rank"],
)
def test_what_validation_refuses_vllm_refuses(
    vllm_server: VllmServer, loader: Loader, tmp_path: Path, config: dict[str, Any]
) -> None:
    path = peft_dir(vllm_server, tmp_path, "refused", **config)
    with pytest.raises(InvalidAdapter):
        validate_adapter_dir(path, max_rank=MAX_RANK, base_model=vllm_server.model)
    response = loader.load(path)
    assert response.status_code != 200, f"vLLM accepted an adapter we refuse: {config}"


def test_what_validation_accepts_vllm_serves(
    vllm_server: VllmServer, loader: Loader, tmp_path: Path
) -> None:
    path = peft_dir(vllm_server, tmp_path, "plain", r=MAX_RANK, init_lora_weights=False)
    validate_adapter_dir(path, max_rank=MAX_RANK, base_model=vllm_server.model)
    response = loader.load(path)
    assert response.status_code == 200, response.text
    prompt = AutoTokenizer.from_pretrained(vllm_server.model_dir)(PROMPT)["input_ids"]
    tokens, _ = complete(vllm_server, loader.loaded[-1], prompt, new_tokens=NEW_TOKENS)
    assert len(tokens) == NEW_TOKENS
