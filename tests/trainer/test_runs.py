"""Run records, run config parsing, the run lock and the trainer metrics (fast, no Flower run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fedpersona.trainer.errors import ConfigError, NoSilo, RoundBusy, RunNotFound
from fedpersona.trainer.flower.runconfig import NodeIdentity, RunConfig, config_of, spec_of
from fedpersona.trainer.rounds.lock import RunLock, resolve_users
from fedpersona.trainer.rounds.metrics import TrainerMetrics
from fedpersona.trainer.rounds.records import (
    ClientRound,
    RoundRecord,
    RoundSpec,
    RunRecords,
    RunState,
    new_run_id,
)
from prometheus_client import generate_latest


def a_round(n: int) -> RoundRecord:
    clients = [
        ClientRound(user="alice", num_examples=3, bytes_up=100, bytes_down=200, train_loss=2.0),
        ClientRound(user="bob", num_examples=1, bytes_up=50, bytes_down=200, train_loss=4.0),
    ]
    return RoundRecord(
        round=n, wall_s=1.5, train_loss=2.5, bytes_up=150, bytes_down=400, clients=clients
    )


def test_records_round_trip_and_list_oldest_first(tmp_path: Path) -> None:
    records = RunRecords(tmp_path / "runs")
    first = records.create(RoundSpec(rounds=2), users=["alice", "bob"])
    second = records.create(RoundSpec(algorithm="fedavg"), users=["alice"])
    records.update(first.id, state=RunState.running, rounds=[a_round(1)], progress=0.5)

    got = records.read(first.id)
    assert got.state == RunState.running and got.progress == 0.5
    assert got.rounds[0].clients[1].user == "bob"
    assert [s.id for s in records.list_all()] == [first.id, second.id]
    on_disk = json.loads((tmp_path / "runs" / f"{first.id}.json").read_text())
    assert on_disk["spec"]["rounds"] == 2 and on_disk["users"] == ["alice", "bob"]
    assert not list((tmp_path / "runs").glob(".*.tmp"))  # no temporary file left behind


@pytest.mark.parametrize("bad", ["../etc/passwd", "r-1", "", "R-20260101t000000-abcdef", "x" * 300])
def test_run_ids_that_are_not_ours_are_not_found(tmp_path: Path, bad: str) -> None:
    with pytest.raises(RunNotFound):
        RunRecords(tmp_path).read(bad)


def test_missing_and_corrupt_records_are_not_found(tmp_path: Path) -> None:
    records = RunRecords(tmp_path)
    run_id = new_run_id()
    with pytest.raises(RunNotFound):
        records.read(run_id)
    (tmp_path / f"{run_id}.json").write_text("{not json")
    with pytest.raises(RunNotFound, match="unreadable"):
        records.read(run_id)
    assert records.list_all() == []


@pytest.mark.parametrize(
    "fields",
    [
        {"rounds": 0},
        {"users": ["Alice"]},
        {"users": ["alice", "alice"]},
        {"users": []},
        {"algorithm": "fedsgd"},
        {"lr": 0},
        {"surprise": 1},
    ],
)
def test_round_spec_refuses_bad_fields(fields: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RoundSpec(**fields)  # type: ignore[arg-type]


def test_run_config_round_trips_through_flower_config(tmp_path: Path) -> None:
    spec = RoundSpec(algorithm="perfit", rounds=3, users=("alice", "bob"), rank=2, lr=0.01)
    config = config_of(spec, run_id=new_run_id(), home=tmp_path, users=("alice", "bob"))
    assert config.store == tmp_path / "store"
    assert config.base_model == tmp_path / "models" / "large"
    flat = config.to_flower()
    assert all(isinstance(v, bool | int | float | str) for v in flat.values())
    assert RunConfig.from_flower(flat) == config
    assert spec_of(config) == spec
    assert config.expected_nodes == 2


def test_run_config_errors_name_the_key(tmp_path: Path) -> None:
    base = {"home": str(tmp_path), "run-id": new_run_id(), "algorithm": "pftt"}
    with pytest.raises(ConfigError, match="unknown run config keys"):
        RunConfig.from_flower({**base, "roundz": 2})
    with pytest.raises(ConfigError, match="rounds"):
        RunConfig.from_flower({**base, "rounds": "many"})
    with pytest.raises(ConfigError, match="algorithm"):
        RunConfig.from_flower({**base, "algorithm": "sgd"})
    with pytest.raises(ConfigError, match="users"):
        RunConfig.from_flower({**base, "users": "alice,../bob"})


def test_node_identity_from_deployment_and_simulation_node_configs(tmp_path: Path) -> None:
    config = config_of(RoundSpec(), run_id=new_run_id(), home=tmp_path, users=("alice", "bob"))
    node = NodeIdentity.from_flower({"user": "carol", "silo": "/data/carol"}, config)
    assert (node.user, node.silo, node.store) == ("carol", Path("/data/carol"), tmp_path / "store")
    sim = NodeIdentity.from_flower({"partition-id": 1, "num-partitions": 2}, config)
    assert (sim.user, sim.silo) == ("bob", tmp_path / "silos" / "bob")
    with pytest.raises(ConfigError, match="partition-id 2"):
        NodeIdentity.from_flower({"partition-id": 2}, config)
    with pytest.raises(ConfigError, match="user"):
        NodeIdentity.from_flower({"user": "../root"}, config)
    with pytest.raises(ConfigError, match="names no user"):
        NodeIdentity.from_flower({}, config)


def test_run_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    held = RunLock(tmp_path)
    with held:
        other = RunLock(tmp_path)
        assert other.held_elsewhere()
        with pytest.raises(RoundBusy):
            other.acquire()
    assert not RunLock(tmp_path).held_elsewhere()


def test_resolve_users_needs_silos(tmp_path: Path) -> None:
    with pytest.raises(NoSilo):
        resolve_users(tmp_path, None)
    for user in ("bob", "alice"):
        (tmp_path / "silos" / user).mkdir(parents=True)
        (tmp_path / "silos" / user / "train.jsonl").write_text("{}\n")
    (tmp_path / "silos" / "Not-A-User").mkdir()
    assert resolve_users(tmp_path, None) == ["alice", "bob"]
    assert resolve_users(tmp_path, ("bob",)) == ["bob"]
    with pytest.raises(NoSilo, match="carol"):
        resolve_users(tmp_path, ("bob", "carol"))


def test_metrics_count_bytes_per_client_without_user_labels() -> None:
    metrics = TrainerMetrics()
    metrics.observe_round("pftt", a_round(1))
    metrics.observe_run_end("pftt", "succeeded")
    text = generate_latest(metrics.registry).decode()
    assert 'fedpersona_trainer_client_uplink_bytes_count{algorithm="pftt"} 2.0' in text
    assert 'fedpersona_trainer_client_uplink_bytes_sum{algorithm="pftt"} 150.0' in text
    assert 'fedpersona_trainer_client_downlink_bytes_sum{algorithm="pftt"} 400.0' in text
    assert 'fedpersona_trainer_train_loss{algorithm="pftt"} 2.5' in text
    assert 'fedpersona_trainer_runs_total{algorithm="pftt",state="succeeded"} 1.0' in text
    assert "alice" not in text and "bob" not in text
