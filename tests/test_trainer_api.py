"""The trainer pod's API (`fedpersona trainer`) and the HTTP round controller that talks to it.

The trainer pod and the gateway serve `/admin/rounds` with one router: these tests check the
statuses and the OpenAI error envelope on the trainer pod, that the HTTP implementation of the
round-controller interface (`interface.remote`) maps every answer back to the in-process
controller's domain errors, and that a gateway forwarding to a trainer pod answers exactly as the
trainer pod does. The training child is `/bin/true`: runs end at once, unfinished.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from fedpersona.service.http.app import create_app as create_gateway
from fedpersona.service.settings import Settings
from fedpersona.trainer.data.personas import write_silos
from fedpersona.trainer.rounds import interface
from fedpersona.trainer.rounds.controller import InProcessRounds
from fedpersona.trainer.rounds.interface import (
    InvalidRoundSpec,
    RoundBusy,
    RoundController,
    RoundSpec,
    RoundsUnreachable,
    RunNotFound,
)
from fedpersona.trainer.rounds.lock import RunLock
from support.servers import free_port, serve_in_thread

from fedpersona.trainer_api import create_app

KEY = "trainer-admin-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
ENVELOPE = {"message", "type", "param", "code"}


def make_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    write_silos(home / "silos", {"alice": "pirate"}, n_train=2, n_eval=1)
    return home


def controller(home: Path) -> InProcessRounds:
    return InProcessRounds(home, python="/bin/true", poll_s=0.05)


def error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()["error"]
    assert set(body) == ENVELOPE
    return body


def test_trainer_api_status_codes_and_envelope(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    rounds = controller(home)
    with TestClient(create_app(rounds, admin_key=KEY)) as client:
        assert client.get("/health").status_code == 200
        assert error(client.post("/admin/rounds", json={}), 401)["code"] == "invalid_api_key"
        wrong = client.get("/admin/rounds", headers={"Authorization": "Bearer nope"})
        assert error(wrong, 401)["type"] == "authentication_error"
        assert (
            error(client.post("/admin/rounds", json={"rounds": 0}, headers=AUTH), 400)["param"]
            == "rounds"
        )
        missing = error(client.post("/admin/rounds", json={"users": ["carol"]}, headers=AUTH), 400)
        assert "carol" in missing["message"] and missing["param"] == "users"
        with RunLock(home / "runs"):
            busy = client.post("/admin/rounds", json={}, headers=AUTH)
            assert error(busy, 409)["code"] == "conflict"
        started = client.post("/admin/rounds", json={"algorithm": "fedavg"}, headers=AUTH)
        assert started.status_code == 202, started.text
        run_id = started.json()["id"]
        assert started.json()["spec"]["algorithm"] == "fedavg"
        assert started.json()["users"] == ["alice"]
        rounds.wait(run_id, timeout=30)
        got = client.get(f"/admin/rounds/{run_id}", headers=AUTH).json()
        assert got["state"] == "failed" and "exited with code 0" in got["error"]
        assert [r["id"] for r in client.get("/admin/rounds", headers=AUTH).json()] == [run_id]
        error(client.get("/admin/rounds/r-20260101t000000-abcdef", headers=AUTH), 404)
        error(client.get("/admin/rounds/..%2F..%2Fetc", headers=AUTH), 404)
        assert "fedpersona_trainer_runs_total" in client.get("/metrics").text
        assert client.get("/ready").json() == {"status": "ready", "active_run": None}


def test_without_an_admin_key_the_admin_api_is_off(tmp_path: Path) -> None:
    """The gateway's rule: no key configured means 403, never an open admin API."""
    with TestClient(create_app(controller(make_home(tmp_path)), admin_key="")) as client:
        off = error(client.get("/admin/rounds", headers={"Authorization": "Bearer x"}), 403)
        assert "FEDPERSONA_ADMIN_KEY" in off["message"]
        error(client.get("/admin/rounds"), 401)


@pytest.fixture
def trainer_pod(tmp_path: Path) -> Iterator[tuple[str, InProcessRounds, Path]]:
    """A real trainer API under uvicorn: (its /admin/rounds URL, its controller, its home)."""
    home = make_home(tmp_path)
    rounds = controller(home)
    with serve_in_thread(create_app(rounds, admin_key=KEY), name="trainer-api") as root:
        yield f"{root}/admin/rounds", rounds, home


def test_remote_controller_maps_every_answer_back(
    trainer_pod: tuple[str, InProcessRounds, Path],
) -> None:
    url, local, home = trainer_pod
    remote = interface.remote(url, admin_key=KEY)
    assert isinstance(remote, RoundController) and isinstance(local, RoundController)
    try:
        with RunLock(home / "runs"), pytest.raises(RoundBusy):
            remote.start(RoundSpec())
        with pytest.raises(InvalidRoundSpec, match="carol") as invalid:
            remote.start(RoundSpec(users=("carol",)))
        assert invalid.value.param == "users"
        run_id = remote.start(RoundSpec(algorithm="fedavg", rounds=2))
        local.wait(run_id, timeout=30)
        assert remote.get(run_id) == local.get(run_id)
        assert remote.get(run_id).spec == RoundSpec(algorithm="fedavg", rounds=2)
        assert remote.list() == local.list()
        with pytest.raises(RunNotFound):
            remote.get("r-20260101t000000-abcdef")
        with pytest.raises(RunNotFound):
            remote.get("../../etc/passwd")  # refused before any request is made
    finally:
        remote.close()

    wrong_key = interface.remote(url, admin_key="not-the-key")
    with pytest.raises(RoundsUnreachable, match="admin key"):
        wrong_key.list()
    nobody = interface.remote(f"http://127.0.0.1:{free_port()}/admin/rounds", admin_key=KEY)
    with pytest.raises(RoundsUnreachable, match="cannot reach"):
        nobody.start(RoundSpec())


class _NoEngine:
    async def health(self) -> bool:
        return False

    async def aclose(self) -> None:
        pass


def test_a_gateway_forwarding_to_the_trainer_pod_answers_as_the_pod_does(
    trainer_pod: tuple[str, InProcessRounds, Path], tmp_path: Path
) -> None:
    url, local, home = trainer_pod
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, home=tmp_path / "gateway", admin_key=KEY, rounds_url=url
    )
    gateway_app = create_gateway(
        settings,
        engine=_NoEngine(),  # type: ignore[arg-type]
        adapters=object(),
        base_model="base",
        rounds_controller=interface.remote(url, admin_key=KEY),
    )
    requests: list[tuple[str, str, dict[str, Any] | None, dict[str, str]]] = [
        ("POST", "", {}, {}),
        ("GET", "", None, {"Authorization": "Bearer wrong"}),
        ("POST", "", {"rounds": 0}, AUTH),
        ("POST", "", {"algorithm": "nope"}, AUTH),
        ("POST", "", {"users": ["carol"]}, AUTH),
        ("GET", "/r-20260101t000000-abcdef", None, AUTH),
        ("GET", "/..%2F..%2Fetc", None, AUTH),
    ]
    with TestClient(gateway_app) as gateway, httpx.Client() as pod:
        for method, path, body, headers in requests:
            direct = pod.request(method, url + path, json=body, headers=headers)
            forwarded = gateway.request(method, "/admin/rounds" + path, json=body, headers=headers)
            assert forwarded.status_code == direct.status_code, (method, path, body)
            assert forwarded.json() == direct.json(), (method, path, body)
        with RunLock(home / "runs"):
            direct = pod.post(url, json={}, headers=AUTH)
            forwarded = gateway.post("/admin/rounds", json={}, headers=AUTH)
        assert direct.status_code == forwarded.status_code == 409
        assert forwarded.json() == direct.json()
        assert direct.json()["error"]["code"] == "conflict"

        started = gateway.post("/admin/rounds", json={"algorithm": "local"}, headers=AUTH)
        assert started.status_code == 202, started.text
        run_id = started.json()["id"]
        local.wait(run_id, timeout=30)
        assert gateway.get(f"/admin/rounds/{run_id}", headers=AUTH).json() == (
            pod.get(f"{url}/{run_id}", headers=AUTH).json()
        )
        assert gateway.get("/admin/rounds", headers=AUTH).json() == (
            pod.get(url, headers=AUTH).json()
        )


def test_gateway_and_trainer_pod_answer_the_same_bad_requests_in_one_envelope(
    tmp_path: Path,
) -> None:
    """Every error of both HTTP APIs, FastAPI's own (validation, unknown route, wrong method)
    included, is the OpenAI envelope, with the same status and body on both."""
    home = make_home(tmp_path)
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, home=tmp_path / "gateway", admin_key=KEY
    )
    gateway_app = create_gateway(
        settings,
        engine=_NoEngine(),  # type: ignore[arg-type]
        adapters=object(),
        base_model="base",
        rounds_controller=controller(home),
    )
    json_header = {**AUTH, "content-type": "application/json"}
    requests: list[tuple[str, str, dict[str, Any], int]] = [
        ("POST", "/admin/rounds", {"json": {}}, 401),
        ("GET", "/admin/rounds", {"headers": {"Authorization": "Bearer wrong"}}, 401),
        ("POST", "/admin/rounds", {"content": b"{bad", "headers": json_header}, 400),
        ("POST", "/admin/rounds", {"json": [1], "headers": AUTH}, 400),
        ("POST", "/admin/rounds", {"json": {"rounds": "x"}, "headers": AUTH}, 400),
        ("POST", "/admin/rounds", {"json": {"rounds": 0}, "headers": AUTH}, 400),
        ("POST", "/admin/rounds", {"json": {"nope": 1}, "headers": AUTH}, 400),
        ("POST", "/admin/rounds", {"json": {"users": ["carol"]}, "headers": AUTH}, 400),
        ("GET", "/admin/rounds/r-20260101t000000-abcdef", {"headers": AUTH}, 404),
        ("GET", "/no-such-route", {}, 404),
        ("DELETE", "/admin/rounds", {"headers": AUTH}, 405),
    ]
    with (
        TestClient(create_app(controller(home), admin_key=KEY)) as pod,
        TestClient(gateway_app) as gateway,
    ):
        for method, path, kwargs, status in requests:
            direct = pod.request(method, path, **kwargs)
            served = gateway.request(method, path, **kwargs)
            assert error(direct, status) == error(served, status), (method, path, kwargs)
        with RunLock(home / "runs"):
            busy = [c.post("/admin/rounds", json={}, headers=AUTH) for c in (pod, gateway)]
        assert error(busy[0], 409) == error(busy[1], 409)
        assert busy[0].json()["error"]["code"] == "conflict"
        # Admin routes without a key name the admin key and where it is set, not user keys.
        missing = error(pod.post("/admin/rounds", json={}), 401)["message"]
        assert "FEDPERSONA_ADMIN_KEY" in missing and "users add" not in missing


def test_serve_warns_at_start_without_an_admin_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from fedpersona.service.commands import serve

    monkeypatch.delenv("FEDPERSONA_ADMIN_KEY", raising=False)
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    with caplog.at_level(logging.WARNING):
        # No model in this home: serve stops before vLLM (exit 2), after the warning.
        assert serve.run(parser.parse_args(["--home", str(tmp_path / "home")])) == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("FEDPERSONA_ADMIN_KEY is not set" in w for w in warnings), caplog.text
