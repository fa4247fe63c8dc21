"""`/admin/rounds` on a fake controller (state machine) and on the real in-process controller.

The gateway reaches the trainer through `fedpersona.trainer.rounds.interface` only, so these
tests do too. The same router behind the trainer pod's API, and the HTTP implementation of the
interface, are tested in `tests/test_trainer_api.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from fastapi.testclient import TestClient
from fedpersona.trainer.rounds import interface
from fedpersona.trainer.rounds.interface import (
    InvalidRoundSpec,
    RoundBusy,
    RoundController,
    RoundSpec,
    RunNotFound,
    RunState,
    RunStatus,
)
from gateway_harness import ADMIN_KEY, Gateway, GatewayFactory

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@dataclass
class FakeRounds:
    """Runs never progress unless the test says so; one at a time like the real one."""

    runs: dict[str, RunStatus] = field(default_factory=dict)
    closed: bool = False

    def start(self, spec: RoundSpec) -> str:
        if spec.rounds == 999:
            raise InvalidRoundSpec("rounds: 999 is too many for this trainer", param="rounds")
        if spec.local_steps == 999:
            raise ValueError("a bug in the controller, not the caller's fault")
        if any(not run.done for run in self.runs.values()):
            raise RoundBusy("run r-1 is still in progress")
        run_id = f"r-{len(self.runs) + 1}"
        self.runs[run_id] = RunStatus(
            id=run_id,
            state=RunState.running,
            spec=spec,
            users=list(spec.users or ()),
            created_at=datetime.now(UTC),
        )
        return run_id

    def get(self, run_id: str) -> RunStatus:
        try:
            return self.runs[run_id]
        except KeyError as e:
            raise RunNotFound(run_id) from e

    def list(self) -> list[RunStatus]:
        return list(self.runs.values())

    def finish(self, run_id: str) -> None:
        self.runs[run_id] = self.runs[run_id].model_copy(update={"state": RunState.succeeded})

    def close(self) -> None:
        self.closed = True


def test_start_follow_and_conflict(make_gateway: GatewayFactory) -> None:
    rounds = FakeRounds()
    assert isinstance(rounds, RoundController)
    gw = make_gateway(rounds=rounds)
    started = gw.client.post(
        "/admin/rounds", json={"algorithm": "pftt", "rounds": 2, "users": ["alice"]}, headers=ADMIN
    )
    assert started.status_code == 202, started.text
    run = started.json()
    assert run["state"] == "running" and run["spec"]["rounds"] == 2
    busy = gw.client.post("/admin/rounds", json={}, headers=ADMIN)
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "conflict"

    rounds.finish(run["id"])
    assert gw.client.get(f"/admin/rounds/{run['id']}", headers=ADMIN).json()["state"] == "succeeded"
    assert gw.client.post("/admin/rounds", json={}, headers=ADMIN).status_code == 202
    assert len(gw.client.get("/admin/rounds", headers=ADMIN).json()) == 2
    missing = gw.client.get("/admin/rounds/r-404", headers=ADMIN)
    assert missing.status_code == 404 and set(missing.json()["error"]) == {
        "message",
        "type",
        "param",
        "code",
    }


def test_bad_specs_and_auth(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(rounds=FakeRounds())
    for body in ({"rounds": 0}, {"algorithm": "nope"}, {"users": ["Bad!"]}, {"extra": 1}):
        response = gw.client.post("/admin/rounds", json=body, headers=ADMIN)
        assert response.status_code == 400, body
    assert gw.client.post("/admin/rounds", json={}).status_code == 401
    invalid = gw.client.post("/admin/rounds", json={"rounds": 999}, headers=ADMIN)
    assert invalid.status_code == 400 and invalid.json()["error"]["param"] == "rounds"
    # Only the interface's InvalidRoundSpec is the caller's fault; any other ValueError is a 500.
    unraised = TestClient(gw.client.app, raise_server_exceptions=False)
    bug = unraised.post("/admin/rounds", json={"local_steps": 999}, headers=ADMIN)
    assert bug.status_code == 500 and bug.json()["error"]["type"] == "internal_error"
    user_key = gw.auth("alice")
    assert gw.client.post("/admin/rounds", json={}, headers=user_key).status_code == 403
    assert gw.client.get("/admin/rounds/r-1", headers=user_key).status_code == 403


def test_no_controller_is_503(gw: Gateway) -> None:
    response = gw.client.get("/admin/rounds", headers=ADMIN)
    assert response.status_code == 503


def test_controller_closed_at_shutdown(make_gateway: GatewayFactory) -> None:
    rounds = FakeRounds()
    gw = make_gateway(rounds=rounds)
    gw.client.__exit__(None, None, None)
    assert rounds.closed


def test_real_controller_refuses_users_without_data(make_gateway: GatewayFactory) -> None:
    gw = make_gateway()
    controller = interface.in_process(gw.settings.home)
    gw.client.app.state.rounds = controller  # type: ignore[attr-defined]
    response = gw.client.post("/admin/rounds", json={"users": ["alice"]}, headers=ADMIN)
    assert response.status_code == 400, response.text
    assert "alice" in response.json()["error"]["message"]
    assert response.json()["error"]["param"] == "users"
    assert gw.client.get("/admin/rounds", headers=ADMIN).json() == []
