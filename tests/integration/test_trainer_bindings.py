"""The trainer pod's round API on the Deployment Engine enforces the operator's node bindings.

The path the chart runs: `POST /admin/rounds` on the trainer API (`fedpersona.trainer_api`), the
in-process round controller with a `SuperLinkTarget` (TLS CA, node bindings), its training child
(`fedpersona train --superlink ... --root-certificates ... --node-bindings ...`), `flwr run`, a
real `flower-superlink` with TLS and `--enable-supernode-auth`, and real `flower-supernode`s
signed with keys registered by `fedpersona nodes register`. Alice's node trains for alice;
Mallory's registered node, bound to `mallory`, claims `alice`. The run's users come from the
bindings (alice and mallory, so the round waits for both nodes): the ServerApp refuses Mallory's
reply, alice's adapter comes from her node only, and nothing is published for mallory.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from fedpersona.adapters import AdapterStore, Slot
from fedpersona.trainer.data.personas import write_silos
from fedpersona.trainer.flower.deployment import (
    SuperLinkAddresses,
    flwr_env,
    register_node,
    superlink_command,
    supernode_command,
)
from fedpersona.trainer.flower.identity import generate_node_key, generate_tls
from fedpersona.trainer.models.basemodel import ModelPair
from fedpersona.trainer.rounds.controller import InProcessRounds
from fedpersona.trainer.rounds.records import RunState
from fedpersona.trainer.rounds.superlink import SuperLinkTarget
from support.processes import free_ports, started, wait_listening

from fedpersona.trainer_api import create_app

pytestmark = [pytest.mark.flower, pytest.mark.slow]

KEY = "trainer-admin-key-0123456789abcdef"
SPEC = {"algorithm": "pftt", "rounds": 1, "local_steps": 1, "batch_size": 2, "max_len": 64}


def diagnostics(*logs: Path) -> str:
    files = [p for d in logs if d.is_dir() for p in sorted(d.glob("*.log"))]
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in files)


def test_trainer_api_runs_pass_the_node_bindings(tmp_path: Path, micro_models: ModelPair) -> None:
    home = tmp_path / "home"
    devices = tmp_path / "devices"  # the silos live on the devices, not in the trainer's home
    write_silos(devices, {"alice": "pirate", "mallory": "chef"}, n_train=4, n_eval=1)
    keys, tls = tmp_path / "keys", generate_tls(tmp_path / "tls", hosts=["127.0.0.1"])
    generate_node_key(keys, "alice-phone")
    generate_node_key(keys, "mallory-laptop")
    bindings = home / "node-bindings.json"
    env = flwr_env(tmp_path / "ops" / ".flwr")
    env["HOME"] = str(tmp_path / "ops")
    fleet, serverappio, control, io_a, io_m = free_ports(5)
    links = SuperLinkAddresses.on(
        "127.0.0.1", fleet=fleet, serverappio=serverappio, control=control
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    with started(
        superlink_command(links, database=tmp_path / "state.db", tls=tls),
        env=env,
        log=logs / "superlink.log",
    ) as link:
        wait_listening(control, timeout=60, proc=link)
        wait_listening(fleet, timeout=60, proc=link)
        nodes = {}
        for name, user in (("alice-phone", "alice"), ("mallory-laptop", "mallory")):
            nodes[name] = register_node(
                keys / f"{name}.pub",
                control=links.control,
                flwr_home=tmp_path / "ops" / ".flwr",
                root_certificates=tls.ca_cert,
                users=(user,),
                bindings_file=bindings,
            )
        rounds = InProcessRounds(
            home,
            poll_s=0.2,
            superlink=SuperLinkTarget(
                control=links.control, root_certificates=tls.ca_cert, node_bindings=bindings
            ),
            extra_args=["--base-model", str(micro_models.large.path)],
        )
        with contextlib.ExitStack() as stack:
            for name, silo, port in (
                ("alice-phone", "alice", io_a),
                ("mallory-laptop", "mallory", io_m),
            ):
                command = supernode_command(
                    superlink_fleet=links.fleet,
                    clientappio=f"127.0.0.1:{port}",
                    user="alice",  # both say alice; only one of them is bound to her
                    silo=devices / silo,
                    store=home / "store" if name == "alice-phone" else tmp_path / "mallory-store",
                    root_certificates=tls.ca_cert,
                    private_key=keys / name,
                )
                stack.enter_context(started(command, env=env, log=logs / f"{name}.log"))
            with TestClient(create_app(rounds, admin_key=KEY)) as client:
                auth = {"Authorization": f"Bearer {KEY}"}
                response = client.post("/admin/rounds", json=SPEC, headers=auth)
                assert response.status_code == 202, response.text
                run_id = response.json()["id"]
                deadline = time.monotonic() + 400
                while rounds.active() == run_id and time.monotonic() < deadline:
                    time.sleep(1)
                final = rounds.wait(run_id, timeout=60)

    report = diagnostics(logs, home / "runs")
    assert final.users == ["alice", "mallory"]  # every bound user, none from the node configs
    assert final.state == RunState.succeeded, f"{final.error}\n{report}"
    (record,) = final.rounds
    assert [c.user for c in record.clients] == ["alice"], report
    mallory = nodes["mallory-laptop"].node_id
    assert len(record.refused) == 1 and f"node {mallory}" in record.refused[0], record.refused
    store = AdapterStore(home / "store")
    served = store.current(Slot.user_served("alice"))
    assert served is not None and served.id == record.served_versions["alice"]
    assert store.current(Slot.user_served("mallory")) is None
    assert AdapterStore(tmp_path / "mallory-store").current(Slot.user_personal("alice"))
