"""The vLLM-side guard (`EngineKeyGuard`): default-deny, open only for probes and metrics.

Runs the middleware around a small Starlette app with the routes vLLM has, including the ones
vLLM's own `--api-key` leaves open (`/invocations`, `/tokenize`, `/pause`). The same guard in a
real vLLM server is exercised in tests/security/.
"""

from __future__ import annotations

import pytest
from fedpersona.service.engine.guard import EngineKeyGuard
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

KEY = "engine-key-0123456789"
PATHS = [
    "/v1/models",
    "/v1/chat/completions",
    "/v1/load_lora_adapter",
    "/invocations",
    "/tokenize",
    "/pause",
    "/abort_requests",
    "/version",
    "/health/../v1/models",
    "/metricsX",
]


def _app() -> TestClient:
    async def ok(_: object) -> PlainTextResponse:
        return PlainTextResponse("ok")

    routes = [Route(p, ok, methods=["GET", "POST"]) for p in [*PATHS, "/health", "/metrics"]]
    app = Starlette(routes=routes)
    app.add_middleware(EngineKeyGuard, key=KEY)
    return TestClient(app)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_every_other_path_needs_the_key(path: str, method: str) -> None:
    client = _app()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        response = client.request(method, path, headers=headers)
        assert response.status_code == 401, (method, path, headers)
        assert response.json()["error"]["type"] == "authentication_error"
    assert client.request(method, path, headers={"Authorization": f"Bearer {KEY}"}).text == "ok"


def test_probes_and_metrics_are_open_for_reading_only() -> None:
    client = _app()
    assert client.get("/health").status_code == 200
    assert client.get("/metrics").status_code == 200
    assert client.post("/metrics").status_code == 401


def test_no_key_no_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    with pytest.raises(RuntimeError, match="VLLM_API_KEY"):
        EngineKeyGuard(_app().app)
    monkeypatch.setenv("VLLM_API_KEY", KEY)
    EngineKeyGuard(_app().app)  # as vLLM builds it: key from its own environment
