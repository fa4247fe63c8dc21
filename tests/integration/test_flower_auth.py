"""Node identity bound to users, with a real SuperLink and real SuperNodes on loopback.

Mallory runs a SuperNode whose node config says `user='alice'`. Without authentication (the
plain-gRPC plumbing mode) the round accepts it and publishes `users/alice/served` built from
Mallory's upload: this is the attack. With the defaults (TLS, `--enable-supernode-auth`, node
keys generated and registered by `fedpersona nodes`, the operator's bindings file):
- a node whose key was never registered cannot join (the SuperLink refuses it);
- Mallory's registered node, bound to `mallory`, claiming `alice` is refused by the ServerApp:
  the round publishes alice's adapter from alice's own node only, and records the refusal.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from fedpersona.adapters import AdapterStore, Slot
from fedpersona.trainer.data.personas import write_silos
from fedpersona.trainer.flower.deployment import (
    SuperLinkAddresses,
    flwr_env,
    register_node,
    submit,
    superlink_command,
    supernode_command,
)
from fedpersona.trainer.flower.identity import NodeBindings, generate_tls
from fedpersona.trainer.flower.runconfig import config_of
from fedpersona.trainer.models.basemodel import ModelPair
from fedpersona.trainer.rounds.records import RoundSpec, RunRecords, RunState, RunStatus
from support.processes import free_ports, started, wait_listening

pytestmark = [pytest.mark.flower, pytest.mark.slow]

SPEC = RoundSpec(
    algorithm="pftt", rounds=1, users=("alice",), local_steps=1, batch_size=2, max_len=64, rank=4
)


def nodes_cli(*argv: str) -> None:
    from fedpersona.cli import main

    assert main(["nodes", *argv]) == 0


def diagnostics(logs: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted(logs.iterdir()))


def setup_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    write_silos(home / "silos", {"alice": "pirate", "mallory": "chef"}, n_train=4, n_eval=1)
    return home


def test_without_authentication_a_node_can_claim_another_user(
    tmp_path: Path, micro_models: ModelPair
) -> None:
    """The plumbing-only mode (no TLS, no auth, no bindings) trusts the node's own word."""
    home = setup_home(tmp_path)
    flwr_home = tmp_path / "flwr" / ".flwr"
    env = flwr_env(flwr_home)
    env["HOME"] = str(flwr_home.parent)
    fleet, serverappio, control, io_m = free_ports(4)
    links = SuperLinkAddresses.on(
        "127.0.0.1", fleet=fleet, serverappio=serverappio, control=control
    )
    status = RunRecords(home / "runs").create(SPEC, users=["alice"])
    config = config_of(
        SPEC, run_id=status.id, home=home, users=("alice",), base_model=micro_models.large.path
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    with started(superlink_command(links), env=env, log=logs / "superlink.log") as link:
        wait_listening(control, timeout=60, proc=link)
        wait_listening(fleet, timeout=60, proc=link)
        mallory = supernode_command(
            superlink_fleet=links.fleet,
            clientappio=f"127.0.0.1:{io_m}",
            user="alice",  # Mallory's device, trained on Mallory's data, says it is alice
            silo=home / "silos" / "mallory",
        )
        with started(mallory, env=env, log=logs / "mallory.log"):
            final = submit(
                config,
                control=links.control,
                flwr_home=flwr_home,
                timeout=300,
                log_file=logs / "flwr-run.log",
            )
    assert final.state == RunState.succeeded, f"{final.error}\n{diagnostics(logs)}"
    served = AdapterStore(home / "store").current(Slot.user_served("alice"))
    assert served is not None and final.rounds[0].served_versions["alice"] == served.id


def test_authenticated_nodes_speak_only_for_their_bound_users(
    tmp_path: Path, micro_models: ModelPair
) -> None:
    home = setup_home(tmp_path)
    keys, tls_dir = tmp_path / "keys", tmp_path / "tls"
    nodes_cli("keygen", "--out", str(keys), "--name", "alice-phone")
    nodes_cli("keygen", "--out", str(keys), "--name", "mallory-laptop")
    nodes_cli("keygen", "--out", str(keys), "--name", "stranger")
    tls = generate_tls(tls_dir, hosts=["127.0.0.1", "localhost"])
    bindings_file = home / "node-bindings.json"
    flwr_home = tmp_path / "flwr" / ".flwr"
    env = flwr_env(flwr_home)
    env["HOME"] = str(flwr_home.parent)
    fleet, serverappio, control, io_a, io_m, io_s = free_ports(6)
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
        alice_node = register_node(
            keys / "alice-phone.pub",
            control=links.control,
            flwr_home=flwr_home,
            root_certificates=tls.ca_cert,
            users=("alice",),
            bindings_file=bindings_file,
        )
        mallory_node = register_node(
            keys / "mallory-laptop.pub",
            control=links.control,
            flwr_home=flwr_home,
            root_certificates=tls.ca_cert,
            users=("mallory",),
            bindings_file=bindings_file,
        )
        assert NodeBindings.load(bindings_file).users_of(alice_node.node_id) == {"alice"}

        def node(name: str, user: str, silo: str, port: int) -> list[str]:
            return supernode_command(
                superlink_fleet=links.fleet,
                clientappio=f"127.0.0.1:{port}",
                user=user,
                silo=home / "silos" / silo,
                store=tmp_path / f"{name}-store" if name != "alice-phone" else None,
                root_certificates=tls.ca_cert,
                private_key=keys / name,
            )

        status = RunRecords(home / "runs").create(SPEC, users=["alice"])
        config = config_of(
            SPEC,
            run_id=status.id,
            home=home,
            users=("alice",),
            base_model=micro_models.large.path,
            node_bindings=bindings_file,
            min_nodes=2,  # wait for both bound nodes, so Mallory's reply is really in the round
        )
        with contextlib.ExitStack() as stack:
            stranger = stack.enter_context(
                started(
                    node("stranger", "alice", "mallory", io_s), env=env, log=logs / "stranger.log"
                )
            )
            stack.enter_context(
                started(
                    node("alice-phone", "alice", "alice", io_a), env=env, log=logs / "alice.log"
                )
            )
            stack.enter_context(
                started(
                    node("mallory-laptop", "alice", "mallory", io_m),
                    env=env,
                    log=logs / "mallory.log",
                )
            )
            final: RunStatus = submit(
                config,
                control=links.control,
                flwr_home=flwr_home,
                timeout=300,
                log_file=logs / "flwr-run.log",
                root_certificates=tls.ca_cert,
            )
            stranger_alive = stranger.poll() is None

    report = diagnostics(logs)
    assert final.state == RunState.succeeded, f"{final.error}\n{report}"
    (record,) = final.rounds
    assert [c.user for c in record.clients] == ["alice"]
    assert len(record.refused) == 1, record.refused
    assert f"node {mallory_node.node_id}" in record.refused[0] and "'alice'" in record.refused[0]
    # alice's served adapter was built from her own node's round: the personal LoRA her node
    # published, never anything from Mallory's (whose node writes only to its own store).
    store = AdapterStore(home / "store")
    served = store.current(Slot.user_served("alice"))
    assert served is not None and served.id == record.served_versions["alice"]
    assert (
        AdapterStore(tmp_path / "mallory-laptop-store").current(Slot.user_personal("alice"))
        is not None
    )  # Mallory's node did train "for alice"; its reply went nowhere
    assert store.current(Slot.user_served("mallory")) is None
    # The unregistered node never became a node of the federation.
    superlink_log = (logs / "superlink.log").read_text()
    stranger_log = (logs / "stranger.log").read_text()
    assert "registration is disabled" in superlink_log or not stranger_alive, report
    assert "Registered node" not in stranger_log
    assert json.loads(bindings_file.read_text())["version"] == 1
