"""Bad bodies, unknown routes, rate limiting, readiness and metrics: statuses and envelopes."""

from __future__ import annotations

from typing import Any

import pytest
from fake_engine import FakeEngine
from fedpersona.service.http.app import create_app
from fedpersona.service.ratelimit import RateLimiter
from gateway_harness import Gateway, GatewayFactory, make_settings

ENVELOPE_KEYS = {"message", "type", "param", "code"}


def _post(gw: Gateway, body: Any, *, raw: bool = False) -> Any:
    headers = {**gw.auth("alice"), "Content-Type": "application/json"}
    if raw:
        return gw.client.post("/v1/chat/completions", content=body, headers=headers)
    return gw.client.post("/v1/chat/completions", json=body, headers=headers)


MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "personal"}, "messages"),
        ({"messages": MSG}, "model"),
        ({"model": "personal", "messages": []}, "messages"),
        ({"model": "personal", "messages": MSG, "n": 2}, "n"),
        ({"model": "personal", "messages": MSG, "temperature": 5}, "temperature"),
        ({"model": "personal", "messages": MSG, "temperature": "hot"}, "temperature"),
        ({"model": "personal", "messages": MSG, "max_tokens": 0}, "max_tokens"),
        ({"model": "personal", "messages": MSG, "top_p": 0}, "top_p"),
        (
            {"model": "personal", "messages": [{"role": "wizard", "content": "x"}]},
            "messages.0.role",
        ),
        ({"model": "personal", "messages": [{"role": "user"}]}, "messages.0.content"),
        ({"model": "personal", "messages": MSG, "stream_options": {"include_usage": True}}, None),
        ({"model": "personal", "messages": MSG, "top_logprobs": 3}, None),
        ({"model": 7, "messages": MSG}, "model"),
        ([1, 2, 3], None),
    ],
)
def test_bad_bodies_are_400_envelopes(gw: Gateway, body: Any, param: str | None) -> None:
    response = _post(gw, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == ENVELOPE_KEYS
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
        assert error["message"].startswith(param)
    assert gw.engine.received == []


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"",
        b"\xff\xfe",
        b'{"model": "personal", ',
        b'{"model": "\xc3\x28"}',  # not UTF-8
        b"[" * 100_000,  # nested deeper than the parser recurses
    ],
)
def test_unparseable_json_is_400(gw: Gateway, raw: bytes) -> None:
    response = _post(gw, raw, raw=True)
    assert response.status_code == 400
    assert set(response.json()["error"]) == ENVELOPE_KEYS
    assert gw.engine.received == []


def test_a_body_that_is_not_json_by_its_content_type_is_400(gw: Gateway) -> None:
    body = b'{"model": "personal", "messages": [{"role": "user", "content": "hi"}]}'
    headers = {**gw.auth("alice"), "content-type": "text/plain"}
    response = gw.client.post("/v1/chat/completions", content=body, headers=headers)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    headers["content-type"] = "application/vnd.api+json; charset=utf-8"
    response = gw.client.post("/v1/chat/completions", content=body, headers=headers)
    assert response.status_code == 200, response.text


def test_auth_is_checked_before_the_body(gw: Gateway) -> None:
    response = gw.client.post("/v1/chat/completions", content=b"{broken")
    assert response.status_code == 401


def test_unknown_route_and_wrong_method_use_the_envelope(gw: Gateway) -> None:
    missing = gw.client.get("/v1/nothing-here", headers=gw.auth("alice"))
    assert missing.status_code == 404 and set(missing.json()["error"]) == ENVELOPE_KEYS
    # Without a key every /v1 path is a 401: credentials are checked before routing.
    assert gw.client.get("/v1/nothing-here").status_code == 401
    wrong = gw.client.get("/v1/chat/completions", headers=gw.auth("alice"))
    assert wrong.status_code == 405 and set(wrong.json()["error"]) == ENVELOPE_KEYS


def test_rate_limit_429_with_retry_after_per_user(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(rate_limit_rpm=6, rate_limit_burst=2)  # one token every 10 s
    assert gw.chat("alice").status_code == 200
    assert gw.chat("alice").status_code == 200
    limited = gw.chat("alice")
    assert limited.status_code == 429
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(limited.headers["retry-after"]) <= 10
    assert gw.chat("bob").status_code == 200  # buckets are per user
    assert "fedpersona_rate_limited_requests_total 1.0" in gw.metrics()


def test_token_bucket_refills_at_rate() -> None:
    now = [0.0]
    limiter = RateLimiter(rate_per_s=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.acquire("u") for _ in range(3)] == [None, None, None]
    assert limiter.acquire("u") == pytest.approx(0.5)
    now[0] = 0.25
    assert limiter.acquire("u") == pytest.approx(0.25)
    now[0] = 0.5
    assert limiter.acquire("u") is None
    now[0] = 100.0  # refill caps at the burst
    assert [limiter.acquire("u") for _ in range(4)][-1] == pytest.approx(0.5)
    assert limiter.acquire("other") is None
    assert RateLimiter.per_minute(0, burst=1) is None


def test_health_and_readiness(gw: Gateway) -> None:
    assert gw.client.get("/health").json() == {"status": "ok"}
    ready = gw.client.get("/ready")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"engine": True, "registry": True, "store": True}
    gw.engine.down = True
    not_ready = gw.client.get("/ready")
    assert not_ready.status_code == 503 and not_ready.json()["checks"]["engine"] is False
    assert "retry-after" in not_ready.headers


class _Supervisor:
    """An embedded engine's supervisor as the app sees it, in a state the test sets."""

    def __init__(self, state: str) -> None:
        self.state = state

    async def start(self) -> None:
        pass

    def on_restart(self, hook: Any) -> None:
        pass

    def check_available(self) -> None:
        pass

    async def stop(self, grace_s: float = 0.0, *, wait_idle: Any = None) -> None:
        pass

    class launch:  # mirrors EngineSupervisor.launch
        base_url = "http://engine.invalid"


def test_not_ready_until_the_supervisor_has_seen_its_engine_ready(
    make_gateway: GatewayFactory,
) -> None:
    # vLLM's /health answers before the supervisor (which polls it) opens the gate for chat:
    # /ready follows the gate, so a probe never routes clients to 503 "starting".
    supervisor = _Supervisor("starting")
    gw = make_gateway(supervisor=supervisor)
    assert gw.client.get("/health").json() == {"status": "ok"}
    starting = gw.client.get("/ready")
    assert starting.status_code == 503 and starting.json()["checks"]["engine"] is False
    supervisor.state = "ready"
    assert gw.client.get("/ready").status_code == 200


def test_readiness_fails_when_registry_unreadable(gw: Gateway) -> None:
    gw.registry.path.unlink()
    gw.registry.path.mkdir()  # sqlite cannot open a directory
    ready = gw.client.get("/ready")
    assert ready.status_code == 503 and ready.json()["checks"]["registry"] is False


def test_metrics_exposed_without_user_labels(gw: Gateway) -> None:
    gw.chat("alice", stream=True)
    gw.chat("alice")
    gw.chat("bob", model="nope")
    text = gw.metrics()
    route = 'method="POST",route="/v1/chat/completions"'
    assert f'fedpersona_http_requests_total{{{route},status="200"}} 2.0' in text
    assert 'route="/v1/chat/completions",status="404"' in text
    assert 'fedpersona_chat_ttft_seconds_count{kind="personal"} 1.0' in text
    assert 'fedpersona_completion_tokens_total{kind="personal"} 10.0' in text
    assert 'fedpersona_prompt_tokens_total{kind="personal"} 14.0' in text
    assert "fedpersona_adapter_load_seconds_count 1.0" in text
    for secret in ("alice", "bob", gw.keys["alice"], "u-alice"):
        assert secret not in text


def test_each_app_has_its_own_metrics(make_gateway: GatewayFactory, tmp_path: Any) -> None:
    gw = make_gateway()
    gw.chat("alice")
    other = create_app(make_settings(tmp_path / "other"), engine=FakeEngine())
    from fastapi.testclient import TestClient

    with TestClient(other) as client:
        text = client.get("/metrics").text
    assert "fedpersona_adapter_loads_total 0.0" in text
    assert "fedpersona_adapter_loads_total 1.0" in gw.metrics()


def test_oversized_bodies_are_413(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(max_request_bytes=2048)
    big = {"model": "personal", "messages": [{"role": "user", "content": "x" * 4096}]}
    declared = gw.client.post("/v1/chat/completions", json=big, headers=gw.auth("alice"))
    assert declared.status_code == 413
    assert declared.json()["error"]["code"] == "request_too_large"

    def chunks() -> Any:  # no Content-Length: the limit is enforced while reading
        yield b'{"model": "personal", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"x" * 1024
        yield b'"}]}'

    streamed = gw.client.post(
        "/v1/chat/completions",
        content=chunks(),
        headers={**gw.auth("alice"), "Content-Type": "application/json"},
    )
    assert streamed.status_code == 413
    assert gw.engine.received == []
    assert gw.chat("alice").status_code == 200


def test_gateway_opens_the_store_read_only(tmp_path: Any) -> None:
    """Replicas share the store volume: none of them cleans up or locks at start-up."""
    settings = make_settings(tmp_path / "home")
    stale = settings.store_path / ".staging" / "users.alice.served" / "left-by-a-publisher"
    stale.mkdir(parents=True)
    app = create_app(settings, engine=FakeEngine())
    store = app.state.services.store
    assert store.read_only and store.root == settings.store_path
    assert stale.is_dir() and not (settings.store_path / ".locks").exists()
    fresh = make_settings(tmp_path / "fresh")
    assert create_app(fresh, engine=FakeEngine()).state.services.store.read_only
    assert fresh.store_path.is_dir()  # an empty store root exists for /ready
