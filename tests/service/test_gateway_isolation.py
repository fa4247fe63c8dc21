"""Tenant isolation: nothing a client sends lets user A reach user B's adapter.

Every attempt is answered with the byte-identical 404 a nonexistent model gets, and no attempt
reaches the engine. Requests that carry B's identity in places the gateway ignores (headers,
body fields) are served with A's own adapter.
"""

from __future__ import annotations

from urllib.parse import quote

import pytest
from fake_engine import BASE_MODEL
from fedpersona.service.errors import ModelNotFound
from fedpersona.service.routing import resolve_model
from gateway_harness import Gateway, engine_name
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


def _attacks(gw: Gateway) -> list[str]:
    bob, alice = gw.served["bob"], gw.served["alice"]
    bob_name, alice_name = engine_name(bob), engine_name(alice)
    return [
        "bob",  # B's user id
        "personal:bob",
        "personal/bob",
        "bob/personal",
        "personal@bob",
        bob_name,  # B's versioned engine name
        bob_name.upper(),
        alice_name,  # even A's own versioned name: only the alias is public
        f"u-bob-{alice.id}",  # B's prefix with A's version id
        "u-bob",
        str(bob.path),  # absolute path of B's adapter
        "../users/bob/served",
        "users/bob/served",
        f"users/bob/served@{bob.id}",
        "..%2Fusers%2Fbob%2Fserved",
        "/etc/passwd",
        "Personal",  # case tricks
        "PERSONAL",
        " personal",
        "personal ",
        "personal\n",
        "\uff50\uff45\uff52\uff53\uff4f\uff4e\uff41\uff4c",  # fullwidth "personal"
        "pe\u0280sonal",  # look-alike letter
        "personal\u200b",  # zero-width space
        "p\u0435rsonal",  # Cyrillic e
        BASE_MODEL.upper(),
        BASE_MODEL + "/../bob",
        f"{BASE_MODEL}:bob",
        "no-such-model",
    ]


def test_every_attempt_gets_the_identical_404_and_never_reaches_the_engine(gw: Gateway) -> None:
    reference = gw.chat("alice", model="no-such-model-at-all")
    assert reference.status_code == 404
    assert reference.json() == {
        "error": {
            "message": "The model does not exist or you do not have access to it.",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }
    for model in _attacks(gw):
        for stream in (False, True):
            response = gw.chat("alice", model=model, stream=stream)
            assert response.status_code == 404, model
            assert response.content == reference.content, model
    assert gw.engine.received == []
    assert gw.engine.load_calls == []


def test_model_detail_endpoint_has_the_same_answer(gw: Gateway) -> None:
    reference = gw.client.get("/v1/models/no-such-model", headers=gw.auth("alice"))
    assert reference.status_code == 404
    for model in _attacks(gw):
        # Quoted like the openai SDK does, so the client does not normalize `..` away.
        response = gw.client.get(f"/v1/models/{quote(model, safe='')}", headers=gw.auth("alice"))
        assert response.status_code == 404, model
        assert response.content == reference.content, model


@pytest.mark.parametrize(
    "headers",
    [
        {"X-User": "bob"},
        {"X-Fedpersona-User": "bob"},
        {"X-User-Id": "bob", "OpenAI-Organization": "bob", "OpenAI-Project": "bob"},
        {"X-Forwarded-User": "bob", "X-Remote-User": "bob"},
        {"X-Lora-Name": "bob", "X-Model": "u-bob"},
    ],
)
def test_identity_headers_are_ignored(gw: Gateway, headers: dict[str, str]) -> None:
    response = gw.client.post(
        "/v1/chat/completions",
        json={"model": "personal", "messages": [{"role": "user", "content": "hi"}], "user": "bob"},
        headers={**headers, **gw.auth("alice")},
    )
    assert response.status_code == 200
    assert gw.engine.last["model"] == engine_name(gw.served["alice"])


def test_second_bearer_header_or_key_of_other_user_in_body_does_not_switch(gw: Gateway) -> None:
    response = gw.client.post(
        "/v1/chat/completions",
        json={
            "model": "personal",
            "messages": [{"role": "user", "content": "hi"}],
            "api_key": gw.keys["bob"],
        },
        headers=gw.auth("alice"),
    )
    assert response.status_code == 200
    assert gw.engine.last["model"] == engine_name(gw.served["alice"])
    assert gw.keys["bob"] not in str(gw.engine.last)


def test_each_user_gets_their_own_adapter(gw: Gateway) -> None:
    for user in ("alice", "bob", "alice", "bob"):
        assert gw.chat(user).status_code == 200
        assert gw.engine.last["model"] == engine_name(gw.served[user])


def test_models_list_shows_only_what_the_caller_may_use(gw: Gateway) -> None:
    response = gw.client.get("/v1/models", headers=gw.auth("alice"))
    assert response.status_code == 200
    ids = [card["id"] for card in response.json()["data"]]
    assert ids == ["personal", BASE_MODEL]
    assert "bob" not in response.text and "u-" not in response.text


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=40))
def test_resolve_accepts_exactly_the_alias_and_the_base_name(name: str) -> None:
    if name in ("personal", BASE_MODEL):
        assert resolve_model(name, alias="personal", base_model=BASE_MODEL).public_name == name
    else:
        with pytest.raises(ModelNotFound) as caught:
            resolve_model(name, alias="personal", base_model=BASE_MODEL)
        assert caught.value.envelope() == ModelNotFound().envelope()
