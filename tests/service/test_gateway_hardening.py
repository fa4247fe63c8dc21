"""Requests a bad client sends: invalid Unicode, too many messages, engine dumps, oversized or
unauthenticated bodies, and settings that would expose the gateway. Fast: fake engine,
Starlette's TestClient. Connection-level attacks against a real uvicorn are in tests/security/.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from fake_engine import FakeEngine
from fedpersona.adapters import Slot
from fedpersona.service.errors import EngineRequestError
from fedpersona.service.http.server import RedactQuery
from fedpersona.service.settings import Settings
from gateway_harness import ADMIN_KEY, Gateway, GatewayFactory
from pydantic import ValidationError

SURROGATE = '"\\ud800"'  # JSON text: an escape that decodes to a lone UTF-16 surrogate


def _raw_chat(gw: Gateway, fields: dict[str, str]) -> Any:
    """Post a body assembled from raw JSON fragments (so escapes reach the server as sent)."""
    body = "{" + ",".join(f'"{k}":{v}' for k, v in fields.items()) + "}"
    headers = {**gw.auth("alice"), "content-type": "application/json"}
    return gw.client.post("/v1/chat/completions", content=body.encode(), headers=headers)


@pytest.mark.parametrize(
    "fields",
    [
        {"messages": f'[{{"role":"user","content":{SURROGATE}}}]'},
        {"messages": f'[{{"role":"user","content":[{{"type":"text","text":{SURROGATE}}}]}}]'},
        {"messages": '[{"role":"user","content":"hi"}]', "stop": SURROGATE},
        {"messages": '[{"role":"user","content":"hi"}]', "stop": f"[{SURROGATE}]"},
        {"messages": f'[{{"role":"user","content":"hi","name":{SURROGATE}}}]'},
    ],
)
def test_lone_surrogates_are_a_400_not_a_500(gw: Gateway, fields: dict[str, str]) -> None:
    response = _raw_chat(gw, {"model": '"personal"', **fields})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert gw.engine.received == []  # never reached the engine


def test_message_count_is_capped(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(max_messages=8)
    empty = [{"role": "user", "content": ""}] * 9
    response = gw.chat("alice", messages=empty)
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
    assert gw.chat("alice", messages=empty[:8]).status_code == 200


def test_each_message_costs_template_tokens(gw: Gateway) -> None:
    # 300 empty messages carry no text, but at least one template token each: more than the
    # 256-token context, refused without asking the engine.
    response = gw.chat("alice", messages=[{"role": "user", "content": ""}] * 300)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert gw.engine.received == []


def test_seed_outside_the_engine_range_is_ours_to_refuse(gw: Gateway) -> None:
    response = gw.chat("alice", seed=10**30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "seed"
    assert gw.engine.received == []


def test_engine_validation_dumps_do_not_reach_users(gw: Gateway) -> None:
    dump = (
        "1 validation error for SamplingParams\nseed\n  Input should be less than 2**63 "
        "[type=less_than, input_value=1000000000000000000000000000000, input_type=int]\n"
        "    For further information visit https://errors.pydantic.dev/2.14/v/less_than"
    )
    gw.engine.error = EngineRequestError(400, {"error": {"message": dump, "param": "seed"}})
    error = gw.chat("alice").json()["error"]
    assert error["message"] == "The inference engine refused a parameter."
    assert error["param"] == "seed"
    gw.engine.error = EngineRequestError(400, {"error": {"message": "top_k must be -1 or > 0"}})
    assert gw.chat("alice").json()["error"]["message"] == "top_k must be -1 or > 0"


def test_a_broken_proxy_expert_is_a_server_error_naming_nothing(
    make_gateway: GatewayFactory,
) -> None:
    gw = make_gateway(proxy_tuning=True)
    from gateway_harness import tiny_lora

    expert = gw.store.publish_lora(Slot.user_expert("alice"), tiny_lora(seed=7))
    ref = f"{expert.slot}@{expert.id}"
    message = f"expert {ref} is invalid: adapter_model.safetensors is truncated"
    gw.engine.error = EngineRequestError(400, {"error": {"message": message}})
    response = gw.chat("alice")
    assert response.status_code == 500, response.text
    assert response.json()["error"]["code"] == "proxy_expert_failed"
    assert "alice" not in response.text and expert.id not in response.text


def test_system_fingerprint_is_dropped(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    original = FakeEngine.chat

    async def with_fingerprint(self: FakeEngine, body: dict[str, Any]) -> dict[str, Any]:
        return {**await original(self, body), "system_fingerprint": "vllm-0.32.0"}

    monkeypatch.setattr(FakeEngine, "chat", with_fingerprint)
    answer = gw.chat("alice").json()
    assert "system_fingerprint" not in answer and answer["choices"]


def test_unauthenticated_bodies_are_refused_before_they_are_read(gw: Gateway) -> None:
    calls: list[str] = []

    def never_parsed() -> Any:
        calls.append("read")
        yield b"{" + b" " * (1024 * 1024)

    response = gw.client.post("/v1/chat/completions", content=never_parsed())
    assert response.status_code == 401 and calls == []
    wrong = {"Authorization": "Bearer fp-000000000000_" + "x" * 43}
    response = gw.client.post("/v1/chat/completions", content=never_parsed(), headers=wrong)
    assert response.status_code == 401 and calls == []
    user_on_admin = gw.client.post("/admin/users", content=never_parsed(), headers=gw.auth("bob"))
    assert user_on_admin.status_code == 403 and calls == []


def test_docs_and_metrics_can_be_closed(make_gateway: GatewayFactory) -> None:
    open_gw = make_gateway()
    assert open_gw.client.get("/openapi.json").status_code == 200
    closed = make_gateway(docs=False, metrics_key="metrics-key-0123456789")
    assert closed.client.get("/docs").status_code == 404
    assert closed.client.get("/openapi.json").status_code == 404
    assert closed.client.get("/metrics").status_code == 401
    scraper = {"Authorization": "Bearer metrics-key-0123456789"}
    scrape = closed.client.get("/metrics", headers=scraper)
    assert scrape.status_code == 200 and "fedpersona" in scrape.text


def test_per_user_in_flight_cap(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(max_in_flight_per_user=1)
    limiter = gw.client.app.state.in_flight  # type: ignore[attr-defined]
    release = limiter.hold("alice")  # one request of alice's is running
    limited = gw.chat("alice")
    assert limited.status_code == 429
    assert limited.json()["error"]["code"] == "too_many_concurrent_requests"
    assert gw.chat("bob").status_code == 200  # others are not affected
    release()
    assert gw.chat("alice").status_code == 200
    stream = gw.chat("alice", stream=True)
    assert stream.status_code == 200 and stream.text.endswith("data: [DONE]\n\n")
    assert limiter.running("alice") == 0  # a finished stream gives its slot back


def test_weak_admin_key_only_on_loopback(tmp_path: Any) -> None:
    Settings(home=tmp_path, admin_key="admin")  # development, loopback: tolerated
    with pytest.raises(ValidationError, match="other machines"):
        Settings(home=tmp_path, admin_key="admin", host="0.0.0.0")
    Settings(home=tmp_path, admin_key=ADMIN_KEY, host="0.0.0.0")
    Settings(home=tmp_path, admin_key="", host="0.0.0.0")  # no key: /admin is off


def test_access_log_never_holds_query_strings() -> None:
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5", "GET", "/v1/models?api_key=fp-0123456789ab_secret", "1.1", 401),
        None,
    )
    assert RedactQuery().filter(record)
    assert "secret" not in record.getMessage()
    assert "/v1/models?<redacted>" in record.getMessage()
    assert json.dumps(record.args)  # still the shape uvicorn's formatter expects


def test_access_log_line_when_the_response_ends(
    make_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    gw = make_gateway()
    with caplog.at_level(logging.INFO, logger="fedpersona.access"):
        secret = gw.keys["alice"]
        gw.client.get(f"/v1/models?api_key={secret}", headers=gw.auth("alice"))
        assert gw.chat("alice", stream=True).status_code == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "fedpersona.access"]
    assert len(lines) == 2, lines
    assert '"GET /v1/models HTTP/1.1" 200 ' in lines[0] and lines[0].endswith(" ms")
    assert secret not in lines[0] and "?" not in lines[0]
    assert '"POST /v1/chat/completions HTTP/1.1" 200 ' in lines[1]

    quiet = make_gateway(access_log=False)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fedpersona.access"):
        assert quiet.chat("alice").status_code == 200
    assert not [r for r in caplog.records if r.name == "fedpersona.access"]
