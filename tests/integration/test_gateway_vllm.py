"""The full gateway against a real vLLM server, driven with the official `openai` SDK.

Checked here with real weights and real greedy decoding: each user is answered by their own
adapter (exactly what vLLM gives for that adapter directly), streaming equals non-streaming, a
newly published version is served from the next request on without a restart (and the old one
is unloaded from vLLM), more users than adapter slots keep working (eviction), one user can never
reach another's adapter, bad input gets the right OpenAI error, a broken adapter fails only its
owner's requests, and a vLLM crash is survived (503 + Retry-After, restart, adapters reloaded).
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest
from fedpersona.adapters import Slot
from fedpersona.adapters.refs import engine_adapter_name as adapter_name
from fedpersona.service.engine.supervisor import EngineState

if TYPE_CHECKING:  # only for annotations: several conftest.py files share the module name
    from conftest import GatewayUnderTest

pytestmark = pytest.mark.vllm

PROMPT = [{"role": "user", "content": "Tell me about the sea."}]
GREEDY: dict[str, Any] = {"temperature": 0.0, "max_tokens": 16, "seed": 0}


def client(gw: GatewayUnderTest, user: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url, api_key=gw.keys[user], max_retries=0, timeout=120)


def ask(gw: GatewayUnderTest, user: str, model: str = "personal") -> str:
    answer = client(gw, user).chat.completions.create(model=model, messages=PROMPT, **GREEDY)  # type: ignore[arg-type]
    assert answer.model == model
    return answer.choices[0].message.content or ""


def direct(gw: GatewayUnderTest, model: str) -> str:
    body = {"model": model, "messages": PROMPT, **GREEDY}
    return str(gw.vllm.direct(body)["choices"][0]["message"]["content"])


def served_name(gw: GatewayUnderTest, user: str) -> str:
    version = gw.store.current(Slot.user_served(user))
    assert version is not None
    return adapter_name(user, version.id)


def wait_until(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def test_each_user_is_answered_by_their_own_adapter(gateway: GatewayUnderTest) -> None:
    gateway.publish("alice", seed=1)
    gateway.publish("bob", seed=2)
    alice, bob = ask(gateway, "alice"), ask(gateway, "bob")
    base = ask(gateway, "alice", model=gateway.vllm.model)
    assert len({alice, bob, base}) == 3, (alice, bob, base)
    # Exactly what vLLM answers for those adapters, and for the base model, directly.
    assert alice == direct(gateway, served_name(gateway, "alice"))
    assert bob == direct(gateway, served_name(gateway, "bob"))
    assert base == direct(gateway, gateway.vllm.model)
    # A user with no adapter yet is answered by the base model under the personal alias.
    assert ask(gateway, "carol") == base


def test_streaming_equals_non_streaming(gateway: GatewayUnderTest) -> None:
    gateway.publish("alice", seed=1)
    whole = ask(gateway, "alice")
    options: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}}
    stream = client(gateway, "alice").chat.completions.create(
        model="personal",
        messages=PROMPT,  # type: ignore[arg-type]
        **options,
        **GREEDY,
    )
    chunks: list[Any] = list(stream)
    assert {c.model for c in chunks} == {"personal"}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens > 0


def test_new_version_is_served_without_restart(gateway: GatewayUnderTest) -> None:
    gateway.publish("alice", seed=1)
    before = ask(gateway, "alice")
    old_name = served_name(gateway, "alice")
    gateway.publish("alice", seed=3)
    new_name = served_name(gateway, "alice")
    after = ask(gateway, "alice")
    assert new_name != old_name and after != before
    assert after == direct(gateway, new_name)
    # The superseded version leaves vLLM once nothing uses it.
    wait_until(lambda: old_name not in gateway.vllm.registered())
    assert new_name in gateway.vllm.registered()


def test_more_users_than_slots_all_served_concurrently(gateway: GatewayUnderTest) -> None:
    users = ["alice", "bob", "carol", "dave", "erin", "frank"]  # 6 users, 4 kept, 2 per batch
    for i, user in enumerate(users):
        gateway.publish(user, seed=100 + i)
    with ThreadPoolExecutor(len(users)) as pool:
        first = dict(zip(users, pool.map(lambda u: ask(gateway, u), users), strict=True))
    with ThreadPoolExecutor(len(users)) as pool:
        again = dict(zip(users, pool.map(lambda u: ask(gateway, u), users), strict=True))
    assert first == again  # reloading an evicted adapter gives the same answers
    assert len(set(first.values())) == len(users)

    # At most max_loaded (4) stay registered in vLLM once requests are done, and vLLM holds
    # exactly what the manager thinks it holds. Only this gateway's users count: the vLLM
    # server is shared by the session, and other modules' gateways leave their own users'
    # adapters registered (a gateway never unloads at exit: replicas share one vLLM).
    def in_vllm() -> list[str]:
        ours = tuple(f"u-{user}-" for user in gateway.keys)
        return sorted(m for m in gateway.vllm.registered() if m.startswith(ours))

    wait_until(lambda: len(gateway.manager.loaded) <= 4)
    wait_until(lambda: in_vllm() == sorted(gateway.manager.loaded))


def test_isolation_matrix(gateway: GatewayUnderTest) -> None:
    gateway.publish("alice", seed=1)
    gateway.publish("bob", seed=2)
    ask(gateway, "bob")  # bob's adapter is loaded in vLLM now
    bob_engine_name = served_name(gateway, "bob")
    forbidden = [bob_engine_name, "bob", "u-bob", "personal-bob", "../bob", "PERSONAL"]
    for model in forbidden:
        with pytest.raises(openai.NotFoundError) as err:
            ask(gateway, "alice", model=model)
        assert err.value.code == "model_not_found", model
        assert "bob" not in str(err.value.body), model
    # Engine-internal fields a client sends are dropped, not forwarded.
    sneaky = client(gateway, "alice").chat.completions.create(
        model="personal",
        messages=PROMPT,  # type: ignore[arg-type]
        extra_body={"lora_request": {"lora_name": bob_engine_name}, "vllm_xargs": {"x": 1}},
        **GREEDY,
    )
    assert sneaky.choices[0].message.content == ask(gateway, "alice")
    assert sneaky.choices[0].message.content != ask(gateway, "bob")
    models = {m.id for m in client(gateway, "alice").models.list()}
    assert models == {"personal", gateway.vllm.model}


def test_bad_inputs_get_openai_errors(gateway: GatewayUnderTest) -> None:
    alice = client(gateway, "alice")
    long_prompt = " ".join(f"word{i}" for i in range(1500))  # > 256 tokens, < the byte guard
    with pytest.raises(openai.BadRequestError) as too_long:
        alice.chat.completions.create(
            model="personal", messages=[{"role": "user", "content": long_prompt}], max_tokens=4
        )
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        alice.chat.completions.create(model="gpt-4o", messages=PROMPT, max_tokens=4)  # type: ignore[arg-type]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gateway.url, api_key="sk-wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError):
        alice.chat.completions.create(model="personal", messages=PROMPT, max_tokens=-1)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError):
        alice.chat.completions.create(model="personal", messages=PROMPT, temperature=-3)  # type: ignore[arg-type]


def test_broken_adapter_fails_only_its_owner(gateway: GatewayUnderTest) -> None:
    version = gateway.publish("dave", seed=7)
    (version.path / "adapter_model.safetensors").write_bytes(b"not safetensors")  # disk damage
    with pytest.raises(openai.InternalServerError) as err:
        ask(gateway, "dave")
    assert err.value.code == "adapter_load_failed"
    assert str(version.path) not in str(err.value.body)  # server paths are not leaked
    assert adapter_name("dave", version.id) not in gateway.manager.loaded
    gateway.publish("erin", seed=8)
    assert ask(gateway, "erin")  # everyone else is unaffected
    gateway.publish("dave", seed=9)  # the trainer publishes a good version: dave is back
    assert ask(gateway, "dave") == direct(gateway, served_name(gateway, "dave"))


@pytest.mark.slow
def test_engine_crash_is_survived(gateway: GatewayUnderTest) -> None:
    """Last in the module: it restarts the shared server (about one vLLM start-up)."""
    gateway.publish("alice", seed=1)
    before = ask(gateway, "alice")
    supervisor = gateway.vllm.supervisor
    pid = supervisor.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: supervisor.state is not EngineState.READY, 30)
    response = httpx.post(
        f"{gateway.url}/chat/completions",
        headers={"Authorization": f"Bearer {gateway.keys['alice']}"},
        json={"model": "personal", "messages": PROMPT, "max_tokens": 4},
        timeout=30,
    )
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) >= 1
    assert response.json()["error"]["code"] == "engine_unavailable"
    wait_until(lambda: supervisor.state is EngineState.READY, 900)
    assert supervisor.pid != pid
    assert gateway.manager.loaded == []  # the restart made the manager forget
    assert ask(gateway, "alice") == before  # reloaded into the new engine, same answer


# ---- the engine's door (issue: vLLM answered anyone on its port) ------------------------------


def test_the_engine_answers_only_its_gateway(gateway: GatewayUnderTest) -> None:
    """Without the engine key nothing but probes and metrics: not the adapter list, not runtime
    LoRA loading, not chat, not the routes vLLM's own --api-key leaves open."""
    base = gateway.vllm.base_url
    victim = (
        served_name(gateway, "alice")
        if gateway.store.current(Slot.user_served("alice"))
        else "anything"
    )
    attempts = [
        ("GET", "/v1/models", None),
        ("POST", "/v1/load_lora_adapter", {"lora_name": "stolen", "lora_path": "/tmp"}),
        ("POST", "/v1/chat/completions", {"model": victim, "messages": PROMPT}),
        ("POST", "/invocations", {"model": victim, "messages": PROMPT}),
        ("POST", "/tokenize", {"model": gateway.vllm.model, "prompt": "x"}),
        ("POST", "/pause", None),
        ("GET", "/version", None),
    ]
    for method, path, body in attempts:
        for headers in ({}, {"Authorization": "Bearer not-the-key"}):
            response = httpx.request(method, base + path, json=body, headers=headers, timeout=30)
            assert response.status_code == 401, (method, path, response.text[:200])
    assert httpx.get(base + "/health", timeout=30).status_code == 200
    assert "vllm:" in httpx.get(base + "/metrics", timeout=30).text
    keyed = httpx.get(base + "/v1/models", headers=gateway.vllm.headers, timeout=30)
    assert keyed.status_code == 200
    assert ask(gateway, "bob")  # and the gateway, which has the key, serves as before
