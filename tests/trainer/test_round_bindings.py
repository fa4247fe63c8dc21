"""The trainer pod's runs on the Deployment Engine carry the operator's node bindings.

`SuperLinkTarget` resolves a run's users against the bindings (not the silos under the home) and
gives the training child its flags; the round controller and the trainer API pass them to every
run. The training child here is a script that records its argv (the real child against real
Flower processes is `tests/integration/test_trainer_bindings.py`).
"""

from __future__ import annotations

import argparse
import json
import stat
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from fedpersona.trainer.errors import ConfigError, InvalidRoundSpec
from fedpersona.trainer.flower.identity import NodeBinding, NodeBindings
from fedpersona.trainer.rounds.controller import InProcessRounds
from fedpersona.trainer.rounds.records import RoundSpec
from fedpersona.trainer.rounds.superlink import SuperLinkTarget
from pydantic import ValidationError

from fedpersona.trainer_api import TrainerApiSettings, add_arguments, build_settings, create_app

KEY = "trainer-admin-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
BIG = 18446744073709551557  # a 64-bit node id, as Flower assigns them


def bindings_file(tmp_path: Path, *bindings: NodeBinding) -> Path:
    path = tmp_path / "node-bindings.json"
    NodeBindings(bindings).save(path)
    return path


def target(tmp_path: Path, *bindings: NodeBinding) -> SuperLinkTarget:
    return SuperLinkTarget(
        control="localhost:9093",
        root_certificates=tmp_path / "ca.crt",
        node_bindings=bindings_file(tmp_path, *bindings),
    )


def recording_python(tmp_path: Path) -> tuple[str, Path]:
    """A stand-in for the training child's interpreter that writes its argv, one per line."""
    out = tmp_path / "argv.txt"
    script = tmp_path / "python"
    script.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {out}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script), out


def test_a_tls_superlink_without_bindings_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="node bindings"):
        SuperLinkTarget(control="localhost:9093", root_certificates=tmp_path / "ca.crt")
    with pytest.raises(ConfigError, match="host:port"):
        SuperLinkTarget(control="localhost", node_bindings=tmp_path / "b.json")


def test_users_come_from_the_bindings(tmp_path: Path) -> None:
    t = target(
        tmp_path,
        NodeBinding(node_id=BIG, users=("bob", "alice")),
        NodeBinding(node_id=7, users=("carol",)),
    )
    assert t.resolve_users(None) == ["alice", "bob", "carol"]
    assert t.resolve_users(("carol",)) == ["carol"]
    with pytest.raises(InvalidRoundSpec, match="mallory") as err:
        t.resolve_users(("alice", "mallory"))
    assert err.value.param == "users"


def test_no_bound_user_or_a_bad_file_is_a_400_not_a_crash(tmp_path: Path) -> None:
    with pytest.raises(InvalidRoundSpec, match="no node is bound"):
        target(tmp_path).resolve_users(None)
    broken = SuperLinkTarget(control="h:1", node_bindings=tmp_path / "missing.json")
    with pytest.raises(InvalidRoundSpec, match="does not exist"):
        broken.resolve_users(None)
    (tmp_path / "bad.json").write_text(json.dumps({"version": 1, "nodes": [{"node_id": 0}]}))
    with pytest.raises(InvalidRoundSpec):
        SuperLinkTarget(control="h:1", node_bindings=tmp_path / "bad.json").resolve_users(None)
    # Plain gRPC without bindings: the run must name its users.
    with pytest.raises(InvalidRoundSpec, match="name the run's users"):
        SuperLinkTarget(control="h:1").resolve_users(None)
    assert SuperLinkTarget(control="h:1").resolve_users(("alice",)) == ["alice"]


def test_the_controller_passes_the_bindings_to_every_run(tmp_path: Path) -> None:
    t = target(tmp_path, NodeBinding(node_id=BIG, users=("alice",)))
    python, argv_file = recording_python(tmp_path)
    home = tmp_path / "home"  # no silos: the SuperNodes hold the data
    rounds = InProcessRounds(
        home, python=python, poll_s=0.05, superlink=t, extra_args=["--cpus", "1"]
    )
    run_id = rounds.start(RoundSpec(algorithm="pftt"))
    status = rounds.wait(run_id, timeout=30)
    assert status.users == ["alice"]
    argv = argv_file.read_text().splitlines()
    assert argv[:2] == ["-m", "fedpersona.trainer.commands.train"]
    assert argv[argv.index("--run-id") + 1] == run_id
    assert argv[argv.index("--superlink") + 1] == "localhost:9093"
    assert argv[argv.index("--root-certificates") + 1] == str(tmp_path / "ca.crt")
    assert argv[argv.index("--node-bindings") + 1] == str(t.node_bindings)
    assert argv[-2:] == ["--cpus", "1"]
    # An operator's update of the bindings reaches the next run without a restart.
    NodeBindings([NodeBinding(node_id=7, users=("bob",))]).save(t.node_bindings)  # type: ignore[arg-type]
    assert rounds.wait(rounds.start(RoundSpec(algorithm="pftt")), timeout=30).users == ["bob"]


def test_the_trainer_api_answers_400_for_an_unbound_user(tmp_path: Path) -> None:
    t = target(tmp_path, NodeBinding(node_id=BIG, users=("alice",)))
    python, _ = recording_python(tmp_path)
    rounds = InProcessRounds(tmp_path / "home", python=python, poll_s=0.05, superlink=t)
    with TestClient(create_app(rounds, admin_key=KEY)) as client:
        refused = client.post("/admin/rounds", json={"users": ["mallory"]}, headers=AUTH)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"] == "users"
        assert "mallory" in refused.json()["error"]["message"]
        started = client.post("/admin/rounds", json={}, headers=AUTH)
        assert started.status_code == 202, started.text
        assert rounds.wait(started.json()["id"], timeout=30).users == ["alice"]


def _settings(argv: list[str]) -> TrainerApiSettings:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return build_settings(parser.parse_args(argv))


def test_trainer_settings_are_secure_unless_told_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in ("FEDPERSONA_ROUNDS_ENGINE", "FEDPERSONA_NODE_BINDINGS"):
        monkeypatch.delenv(key, raising=False)
    assert _settings([]).superlink_target() is None  # the Simulation Engine
    with pytest.raises(ValidationError, match="root_certificates"):
        _settings(["--engine", "deployment"])
    with pytest.raises(ValidationError, match="node_bindings"):
        _settings(["--engine", "deployment", "--root-certificates", "ca.crt"])
    with pytest.raises(ValidationError, match="exclude"):
        _settings(["--engine", "deployment", "--insecure-superlink", "--root-certificates", "c"])
    secure = _settings(
        ["--engine", "deployment", "--root-certificates", "ca.crt", "--node-bindings", "b.json"]
    ).superlink_target()
    assert secure is not None and secure.control == "127.0.0.1:9093"
    assert secure.node_bindings == Path("b.json")
    plain = _settings(["--engine", "deployment", "--insecure-superlink", "--control-port", "1"])
    assert plain.superlink_target() == SuperLinkTarget(control="127.0.0.1:1")
