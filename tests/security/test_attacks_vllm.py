"""Issue 13's attacks replayed against real processes: the session vLLM and a gateway before it.

Each test is one row of the matrix in docs/security.md. The engine's door is attacked directly on
vLLM's port; everything else goes through the gateway with a user's key. The re-created user
name attack has its own module, `tests/integration/test_deleted_user_vllm.py` (not repeated
here). Connection-level attacks against the gateway's own uvicorn configuration are in
`test_connections.py`.
"""

from __future__ import annotations

import json
import re
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import real_processes
from fedpersona.adapters import Slot
from fedpersona.adapters.refs import ALPHA_ARG, EXPERT_ARG
from fedpersona.adapters.refs import engine_adapter_name as adapter_name
from real_processes import ADMIN_KEY, GatewayUnderTest

# The fixtures are the integration suite's (one definition, `real_processes`); imported here
# rather than from a conftest.py in this folder, because integration modules import their own
# conftest by name and a second one collected beside it would shadow it.
vllm_server = real_processes.vllm_server
gateway = real_processes.gateway

pytestmark = pytest.mark.vllm

PROMPT = [{"role": "user", "content": "Tell me about the sea."}]
GREEDY: dict[str, Any] = {"temperature": 0.0, "max_tokens": 16, "seed": 0}


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _chat(gw: GatewayUnderTest, user: str, **body: Any) -> httpx.Response:
    payload = {"model": "personal", "messages": PROMPT, **GREEDY, **body}
    return httpx.post(
        f"{gw.url}/chat/completions", json=payload, headers=_auth(gw.keys[user]), timeout=120
    )


def _answer(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text[:300]
    return str(response.json()["choices"][0]["message"]["content"])


def _served(gw: GatewayUnderTest, user: str) -> str:
    version = gw.store.current(Slot.user_served(user))
    if version is None:
        version = gw.publish(user, seed=sum(map(ord, user)))
    return adapter_name(user, version.id)


def _metric(base_url: str, name: str) -> float:
    """Sum of a vLLM Prometheus metric over its label sets (`/metrics` needs no key)."""
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? ([0-9.eE+-]+)$", re.MULTILINE)
    return sum(float(value) for value in pattern.findall(text))


# ---- the engine's port ------------------------------------------------------------------------


def test_engine_port_refuses_everything_without_its_key(gateway: GatewayUnderTest) -> None:
    alice = _served(gateway, "alice")
    _answer(_chat(gateway, "alice"))  # alice's adapter is loaded in vLLM now
    base = gateway.vllm.base_url
    alice_path = str(gateway.store.current(Slot.user_served("alice")).path)  # type: ignore[union-attr]
    stolen = {
        "model": alice,
        "messages": PROMPT,
        "vllm_xargs": {EXPERT_ARG: "users/alice/expert@0", ALPHA_ARG: 1.0},
    }
    attempts = [
        ("GET", "/v1/models", None),
        ("POST", "/v1/load_lora_adapter", {"lora_name": "stolen", "lora_path": alice_path}),
        ("POST", "/v1/chat/completions", stolen),
        ("POST", "/invocations", stolen),
        ("POST", "/tokenize", {"model": gateway.vllm.model, "prompt": "x"}),
    ]
    for method, path, body in attempts:
        for headers in ({}, {"Authorization": "Bearer not-the-key"}):
            response = httpx.request(method, base + path, json=body, headers=headers, timeout=30)
            assert response.status_code == 401, (method, path, response.text[:200])
            assert "u-alice" not in response.text
    assert "stolen" not in gateway.vllm.registered()


def test_engine_key_is_accepted(gateway: GatewayUnderTest) -> None:
    alice = _served(gateway, "alice")
    _answer(_chat(gateway, "alice"))
    base, headers = gateway.vllm.base_url, gateway.vllm.headers
    assert alice in gateway.vllm.registered()
    tokens = httpx.post(
        f"{base}/tokenize",
        json={"model": gateway.vllm.model, "prompt": "x"},
        headers=headers,
        timeout=30,
    )
    assert tokens.status_code == 200 and tokens.json()["tokens"]


# ---- what a user may smuggle through the gateway ----------------------------------------------


def test_smuggled_engine_fields_are_ignored(gateway: GatewayUnderTest) -> None:
    bob = _served(gateway, "bob")
    _served(gateway, "alice")
    own = _answer(_chat(gateway, "alice"))
    bobs = _answer(_chat(gateway, "bob"))
    assert own != bobs  # the adapters really differ, so a leak would show
    smuggled = [
        {"vllm_xargs": {EXPERT_ARG: "users/bob/expert@0", ALPHA_ARG: 1.0}},
        {"lora_request": {"lora_name": bob, "lora_int_id": 1, "lora_path": "/tmp"}},
        {"extra_body": {"model": bob, "lora_request": {"lora_name": bob}}},
        {"lora_name": bob, "adapter": bob, "model_name": bob},
    ]
    for fields in smuggled:
        assert _answer(_chat(gateway, "alice", **fields)) == own, fields


def test_another_users_engine_adapter_name_is_not_found(gateway: GatewayUnderTest) -> None:
    bob = _served(gateway, "bob")
    _answer(_chat(gateway, "bob"))  # loaded in vLLM, so only the gateway stands in the way
    for model in (bob, bob.upper(), f" {bob}", f"{bob}\u200b", "u-bob", "bob", "../bob"):
        response = _chat(gateway, "alice", model=model)
        assert response.status_code == 404, (model, response.text[:200])
        assert response.json()["error"]["code"] == "model_not_found"
        assert "bob" not in response.text.replace(model, ""), model


# ---- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        '{"model":"personal","messages":[{"role":"user","content":"\\ud800"}],"max_tokens":4}',
        '{"model":"personal","messages":[{"role":"user","content":"hi"}],'
        '"stop":"\\udfff","max_tokens":4}',
        '{"model":"personal","messages":[{"role":"user","content":[{"type":"text",'
        '"text":"a\\udbffb"}]}],"max_tokens":4}',
    ],
    ids=["content", "stop", "content-part"],
)
def test_lone_surrogates_are_400(gateway: GatewayUnderTest, body: str) -> None:
    headers = {**_auth(gateway.keys["alice"]), "Content-Type": "application/json"}
    response = httpx.post(
        f"{gateway.url}/chat/completions", content=body.encode(), headers=headers, timeout=60
    )
    assert response.status_code == 400, response.text[:300]
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_message_count_is_capped(gateway: GatewayUnderTest) -> None:
    cap = gateway.settings.max_messages
    many = [{"role": "user", "content": ""}] * (cap + 1)
    started = time.monotonic()
    response = _chat(gateway, "alice", messages=many)
    assert response.status_code == 400, response.text[:300]
    assert time.monotonic() - started < 5  # refused before the engine renders a template
    huge = [{"role": "user", "content": ""}] * 50_000
    assert _chat(gateway, "alice", messages=huge).status_code in (400, 413)
    _answer(_chat(gateway, "alice", messages=PROMPT * 3))  # a normal conversation still works


# ---- the admin API with a user's key -----------------------------------------------------------


def test_admin_endpoints_refuse_user_keys(gateway: GatewayUnderTest) -> None:
    calls = [
        ("GET", "/admin/users", None),
        ("POST", "/admin/users", {"name": "mallory"}),
        ("GET", "/admin/users/bob", None),
        ("PATCH", "/admin/users/bob", {"proxy_alpha": 1.0}),
        ("DELETE", "/admin/users/bob", None),
        ("POST", "/admin/users/bob/keys", None),
        ("GET", "/admin/users/bob/keys", None),
        ("DELETE", "/admin/keys/1", None),
        ("POST", "/admin/rounds", {}),
    ]
    for method, path, body in calls:
        for key in (gateway.keys["alice"], "fp-forged", ADMIN_KEY + "x"):
            response = httpx.request(
                method, gateway.root + path, json=body, headers=_auth(key), timeout=30
            )
            assert response.status_code in (401, 403), (method, path, response.status_code)
    assert "bob" in gateway.keys and gateway.registry.get_user("bob") is not None


# ---- abandoned requests ------------------------------------------------------------------------

LONG = 200  # tokens; the micro model's context is 256


def _send_and_leave(gw: GatewayUnderTest, body: dict[str, Any]) -> socket.socket:
    raw = json.dumps(body).encode()
    url = urlsplit(gw.root)
    sock = socket.create_connection((url.hostname, url.port), timeout=10)
    sock.sendall(
        (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {gw.keys['alice']}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(raw)}\r\n\r\n"
        ).encode()
        + raw
    )
    return sock


def test_abandoned_request_is_cancelled_in_the_engine(gateway: GatewayUnderTest) -> None:
    body = {
        "model": gateway.vllm.model,
        "messages": [{"role": "user", "content": "Count."}],
        "temperature": 0.0,
        "max_tokens": LONG,
        "ignore_eos": True,  # dropped by the gateway's allow-list; greedy decoding decides
    }
    # Control: the same greedy request, waited for, runs to max_tokens.
    started = time.monotonic()
    control = httpx.post(
        f"{gateway.url}/chat/completions",
        json=body,
        headers=_auth(gateway.keys["alice"]),
        timeout=120,
    ).json()
    control_s = time.monotonic() - started
    assert control["usage"]["completion_tokens"] == LONG, control["usage"]

    # The micro model is fast (the control above takes well under a second): leave once vLLM
    # reports the requests running. An attempt where the requests finished before vLLM's gauge
    # showed them proves nothing either way and is repeated.
    # An attempt counts only if we left while most of the work was still ahead (on a quiet
    # machine the six answers can take under a second, so the gauge may show them running
    # only when they are nearly done; such an attempt is repeated, never counted).
    n = 6
    for _attempt in range(10):
        generated, at_leave = _abandon(gateway, body, n)
        if at_leave is not None and at_leave <= n * LONG / 4:
            break
    else:
        pytest.fail("vLLM never reported the requests running while most of them was ahead")
    print(
        f"\ncontrol: {LONG} tokens in {control_s:.2f} s; abandoned x{n}: {generated:.0f} tokens"
        f" ({at_leave:.0f} when the clients left)"
    )
    # Without cancellation every request runs to max_tokens: n * LONG tokens.
    assert generated < n * LONG / 2, (generated, at_leave, n * LONG)


def _abandon(gw: GatewayUnderTest, body: dict[str, Any], n: int) -> tuple[float, float | None]:
    """Send `n` requests and leave once vLLM runs them. Returns the tokens generated in all, and
    those generated when the clients left (None if vLLM never showed them running)."""
    base = gw.vllm.base_url
    before = _metric(base, "vllm:generation_tokens_total")
    sockets = [_send_and_leave(gw, body) for _ in range(n)]
    deadline = time.monotonic() + 5
    seen = False
    while not seen and time.monotonic() < deadline:
        seen = _metric(base, "vllm:num_requests_running") >= 1
    for sock in sockets:
        sock.close()
    # Read after leaving (the read takes time): an upper bound on the tokens made before it.
    at_leave = _metric(base, "vllm:generation_tokens_total") - before if seen else None
    # Counters are published after engine steps: wait until nothing runs and they stand still.
    deadline, last = time.monotonic() + 60, -1.0
    while True:
        assert time.monotonic() < deadline, "abandoned requests still running"
        busy = _metric(base, "vllm:num_requests_running") + _metric(
            base, "vllm:num_requests_waiting"
        )
        generated = _metric(base, "vllm:generation_tokens_total") - before
        if busy == 0 and generated == last:
            return generated, at_leave
        last = generated
        time.sleep(0.5)
