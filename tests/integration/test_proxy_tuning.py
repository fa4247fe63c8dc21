"""FedPT inside the real vLLM server: the proxy-tuning logits processor, end to end.

The session server (`vllm_server`, tests/integration/conftest.py) runs with the processor on,
the MICRO small model as the proxy base, and its store at `FEDPERSONA_STORE_DIR`; experts are
published there as random LoRAs on the small model with weights large enough to change greedy
outputs. Checked:
- greedy decoding through vLLM equals, token for token, `large + alpha * (expert - small)`
  computed by transformers from the three models, for several prompts, experts and alphas,
  sent concurrently in one batch with requests that use no expert (those equal plain `large`);
- a bad expert fails only its own request (HTTP 400 from request validation; an expert that
  only fails inside the engine ends its request with no text), the others are still exact;
- no state growth over 100 requests (the processor's counters file);
- through the gateway: a user's proxy expert (per-user alpha) combines with their LoRA on the
  large model, and users without their own expert get the global one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from fedpersona.adapters import AdapterStore, Slot, Version, load_lora
from fedpersona.adapters.refs import engine_adapter_name as adapter_name
from fedpersona.service.proxy_tuning.experts import merge_lora
from fedpersona.trainer.models.basemodel import ModelPair
from support.gateway import RunningGateway, running_gateway
from support.lora import strong_lora
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.vllm

MAX_TOKENS = 32
ADMIN_KEY = "proxy-integration-admin-key-0123456789"
# This module takes the session server only as a fixture, never `from conftest import ...`:
# with several conftest.py in the suite, which one that names depends on collection order.
VllmServer = Any  # tests/integration/conftest.py's VllmServer (base_url, model, supervisor)


# Greedy picks where two logits lie closer than this are ties the two float paths (vLLM's CPU
# kernels, transformers) may break differently; every other step must match exactly.
TIE = 1e-3


@dataclass
class ProxyEnv:
    server: VllmServer
    store: AdapterStore
    stats_file: Path
    models: ModelPair
    max_model_len: int

    def publish_expert(self, slot: Slot, seed: int, *, model_dir: Path | None = None) -> Version:
        adapter = strong_lora(model_dir or self.models.small.path, self.models.small.name, seed)
        return self.store.publish_lora(slot, adapter, metadata={"seed": seed})

    def stats(self) -> dict[str, int]:
        data: dict[str, int] = json.loads(self.stats_file.read_text())
        return data

    def complete(
        self,
        prompt: list[int],
        *,
        expert: str | None = None,
        alpha: float = 1.0,
        max_tokens: int = MAX_TOKENS,
        ignore_eos: bool = True,
    ) -> httpx.Response:
        body: dict[str, Any] = {
            "model": self.server.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": ignore_eos,
            "return_token_ids": True,
        }
        if expert is not None:
            body["vllm_xargs"] = {"fedpersona_expert": expert, "fedpersona_alpha": alpha}
        return httpx.post(
            f"{self.server.base_url}/v1/completions",
            json=body,
            headers=self.server.headers,
            timeout=300,
        )


@pytest.fixture(scope="module")
def proxy(vllm_server: VllmServer, micro_models: ModelPair) -> ProxyEnv:
    env, argv = vllm_server.supervisor.launch.env, vllm_server.supervisor.launch.argv
    assert "FEDPERSONA_STORE_DIR" in env, "the session vLLM server runs without proxy tuning"
    assert "FEDPERSONA_PROXY_STATS_FILE" in env, "the session server writes no proxy stats"
    return ProxyEnv(
        server=vllm_server,
        store=AdapterStore(env["FEDPERSONA_STORE_DIR"], max_rank=64),
        stats_file=Path(env["FEDPERSONA_PROXY_STATS_FILE"]),
        models=micro_models,
        max_model_len=int(argv[argv.index("--max-model-len") + 1]),
    )


class Reference:
    """`large + alpha * (expert - small)` in transformers, float32, teacher-forced."""

    def __init__(self, models: ModelPair) -> None:
        self.large = AutoModelForCausalLM.from_pretrained(str(models.large.path)).eval()
        self.small = AutoModelForCausalLM.from_pretrained(str(models.small.path)).eval()
        self.vocab = int(self.small.config.vocab_size)

    @torch.no_grad()
    def logits(
        self, tokens: list[int], expert: torch.nn.Module | None, alpha: float
    ) -> torch.Tensor:
        """Next-token logits after every position of `tokens`."""
        x = torch.tensor([tokens])
        logits = self.large(input_ids=x).logits[0]
        if expert is not None:
            offset = expert(input_ids=x).logits[0] - self.small(input_ids=x).logits[0]
            logits[:, : self.vocab] += alpha * offset[:, : self.vocab]
        return logits

    def check(
        self, prompt: list[int], output: list[int], expert: torch.nn.Module | None, alpha: float
    ) -> int:
        """Assert every greedy token of `output` is the reference argmax (or within TIE of it);
        return how many steps were such ties."""
        assert len(output) == MAX_TOKENS
        logits = self.logits(prompt + output, expert, alpha)[len(prompt) - 1 : -1]
        ties = 0
        for step, (row, token) in enumerate(zip(logits, output, strict=True)):
            best = int(row.argmax())
            if token != best:
                gap = float(row[best] - row[token])
                assert gap < TIE, f"step {step}: vLLM chose {token}, reference {best} (gap {gap})"
                ties += 1
        return ties


PROMPTS = (
    "Tell me about the sea.",
    "How do I cook rice?",
    "Write a poem about the moon.",
    "What is a database index?",
)


@pytest.fixture(scope="module")
def ref(micro_models: ModelPair) -> Reference:
    return Reference(micro_models)


def chat_prompt(models: ModelPair, text: str) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(models.large.path))
    encoded: Any = tok.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, return_dict=True
    )
    return [int(t) for t in encoded["input_ids"]]


def test_greedy_equals_reference_in_a_mixed_concurrent_batch(
    proxy: ProxyEnv, ref: Reference
) -> None:
    alice = proxy.publish_expert(Slot.user_expert("alice"), seed=11)
    glob = proxy.publish_expert(Slot.global_expert(), seed=12)
    experts = {
        f"{v.slot.path}@{v.id}": merge_lora(ref.small, load_lora(v.path), where="ref").eval()
        for v in (alice, glob)
    }
    names = list(experts)
    prompts = [chat_prompt(proxy.models, p) for p in PROMPTS]
    jobs: list[tuple[list[int], str | None, float]] = []
    for i, prompt in enumerate(prompts):
        jobs.append((prompt, None, 1.0))
        jobs.append((prompt, names[i % 2], 1.0))
        jobs.append((prompt, names[(i + 1) % 2], 0.5 + i * 0.25))
    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(lambda j: proxy.complete(j[0], expert=j[1], alpha=j[2]), jobs))
    outputs = []
    for response in responses:
        assert response.status_code == 200, response.text
        outputs.append(response.json()["choices"][0]["token_ids"])
    ties = sum(
        ref.check(prompt, out, experts[name] if name else None, alpha)
        for (prompt, name, alpha), out in zip(jobs, outputs, strict=True)
    )
    assert ties <= 2, f"{ties} near-ties: prompts with razor-thin margins"
    # The experts visibly steer: per prompt, plain and the two proxied answers all differ.
    for i in range(len(prompts)):
        plain, first, second = outputs[3 * i : 3 * i + 3]
        assert plain != first and plain != second and first != second


def test_a_bad_expert_fails_only_its_own_request(proxy: ProxyEnv, ref: Reference) -> None:
    good = proxy.publish_expert(Slot.user_expert("bob"), seed=21)
    # Valid files for the small model's name, but trained on a deeper model: passes request
    # validation, fails when the engine merges it.
    broken = proxy.publish_expert(
        Slot.user_expert("mallory"), seed=22, model_dir=proxy.models.large.path
    )
    prompt = chat_prompt(proxy.models, PROMPTS[0])
    good_name = f"{good.slot.path}@{good.id}"
    failures_before = proxy.stats()["failures"]
    jobs: list[tuple[str | None, bool]] = [
        (good_name, True),
        ("users/bob/expert@0123456789abcdef", True),  # no such version
        ("users/bob/served@" + good.id, True),  # not an expert slot
        ("../../etc@0123456789abcdef", True),
        (f"{broken.slot.path}@{broken.id}", False),
        (None, True),
    ]
    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(
            pool.map(lambda j: proxy.complete(prompt, expert=j[0], ignore_eos=j[1]), jobs)
        )
    codes = [r.status_code for r in responses]
    assert codes == [200, 400, 400, 400, 200, 200], [r.text for r in responses]
    assert "no version 0123456789abcdef" in responses[1].json()["error"]["message"]
    assert "not an expert slot" in responses[2].json()["error"]["message"]
    broken_choice = responses[4].json()["choices"][0]
    assert broken_choice["text"] == "" and broken_choice["finish_reason"] == "stop"
    assert proxy.stats()["failures"] == failures_before + 1
    expert = merge_lora(ref.small, load_lora(good.path), where="ref").eval()
    assert ref.check(prompt, responses[0].json()["choices"][0]["token_ids"], expert, 1.0) <= 1
    assert ref.check(prompt, responses[5].json()["choices"][0]["token_ids"], None, 1.0) <= 1


def test_no_state_growth_over_100_requests(proxy: ProxyEnv) -> None:
    versions = [proxy.publish_expert(Slot.user_expert(f"user{i}"), seed=100 + i) for i in range(6)]
    names = [f"{v.slot.path}@{v.id}" for v in versions]
    prompts = [chat_prompt(proxy.models, p) for p in PROMPTS]
    before = proxy.stats()

    def one(i: int) -> int:
        expert = names[i % len(names)] if i % 4 else None
        return proxy.complete(prompts[i % len(prompts)], expert=expert, max_tokens=8).status_code

    with ThreadPoolExecutor(12) as pool:
        assert set(pool.map(one, range(100))) == {200}
    # Finished requests leave the batch at the engine's next step: one more request.
    assert proxy.complete(prompts[0], max_tokens=1).status_code == 200
    after = proxy.stats()
    assert after["live_requests"] == 0 and after["kv_bytes"] == 0, after
    assert after["created"] - before["created"] == 75
    assert after["created"] == after["freed"]
    assert after["experts_cached"] <= 4 and after["expert_loads"] - before["expert_loads"] >= 6


# ------------------------------------------------------------------ through the gateway


@pytest.fixture(scope="module")
def proxy_gateway(
    proxy: ProxyEnv, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    """The real app with proxy tuning on, sharing the vLLM server's store."""
    with running_gateway(
        home=tmp_path_factory.mktemp("proxy-gateway-home"),
        engine_url=proxy.server.base_url,
        model=proxy.server.model,
        max_model_len=proxy.max_model_len,
        admin_key=ADMIN_KEY,
        users=("pia", "quinn"),
        gate=proxy.server.supervisor.check_available,
        engine_api_key=proxy.server.api_key,
        store_dir=proxy.store.root,
        proxy_tuning=True,
    ) as running:
        yield running


MESSAGES = [{"role": "user", "content": PROMPTS[2]}]
CHAT: dict[str, Any] = {"temperature": 0.0, "max_tokens": 16}


def ask(gw: RunningGateway, user: str) -> str:
    client = openai.OpenAI(base_url=gw.url, api_key=gw.keys[user], max_retries=0, timeout=120)
    answer = client.chat.completions.create(model="personal", messages=MESSAGES, **CHAT)  # type: ignore[arg-type]
    return answer.choices[0].message.content or ""


def direct(proxy: ProxyEnv, model: str, expert: Version | None, alpha: float = 1.0) -> str:
    body: dict[str, Any] = {"model": model, "messages": MESSAGES, **CHAT}
    if expert is not None:
        body["vllm_xargs"] = {
            "fedpersona_expert": f"{expert.slot.path}@{expert.id}",
            "fedpersona_alpha": alpha,
        }
    return str(proxy.server.direct(body)["choices"][0]["message"]["content"])


def test_gateway_combines_the_users_lora_with_their_proxy_expert(
    proxy: ProxyEnv, proxy_gateway: RunningGateway
) -> None:
    lora = proxy.store.publish_lora(
        Slot.user_served("pia"),
        strong_lora(proxy.models.large.path, proxy.models.large.name, 31),
        metadata={},
    )
    expert = proxy.publish_expert(Slot.user_expert("pia"), seed=32)
    combined = ask(proxy_gateway, "pia")  # also makes the gateway load pia's LoRA into vLLM
    served = adapter_name("pia", lora.id)
    assert combined == direct(proxy, served, expert)
    lora_only = direct(proxy, served, None)
    assert combined != lora_only
    # alpha is per user: 0 switches the expert's effect off exactly.
    proxy_gateway.registry.set_proxy_alpha("pia", 0.0)
    assert ask(proxy_gateway, "pia") == lora_only
    proxy_gateway.registry.set_proxy_alpha("pia", 0.5)
    assert ask(proxy_gateway, "pia") == direct(proxy, served, expert, alpha=0.5)


def test_gateway_falls_back_to_the_global_expert(
    proxy: ProxyEnv, proxy_gateway: RunningGateway
) -> None:
    glob = proxy.store.current(Slot.global_expert()) or proxy.publish_expert(
        Slot.global_expert(), seed=41
    )
    answer = ask(proxy_gateway, "quinn")  # quinn has neither a LoRA nor an own expert
    assert answer == direct(proxy, proxy.server.model, glob)
    assert answer != direct(proxy, proxy.server.model, None)
