"""The trainer on Flower's Deployment Engine: a real SuperLink and two SuperNodes on loopback.

Each SuperNode is one user's device: its node config names the user and the silo. `flwr run`
submits the Flower App in `trainer/flower/flwr_app/`; the round must complete and publish a global
adapter and both users' served adapters, exactly as in simulation. Random free ports and a
temporary FLWR_HOME/HOME keep it away from anything else on the machine.

The second test runs the same round with fedpersona imported from its wheel installed into a
folder (not the editable checkout) by the SuperLink, the SuperNodes and the apps they start, with
unrelated packages named `adapters`, `trainer` and `service` first on their PYTHONPATH.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
from fedpersona.adapters import AdapterStore, Slot, load_lora
from fedpersona.trainer.data.personas import write_silos
from fedpersona.trainer.flower.deployment import (
    SuperLinkAddresses,
    flwr_env,
    submit,
    superlink_command,
    supernode_command,
)
from fedpersona.trainer.flower.runconfig import config_of
from fedpersona.trainer.models.basemodel import ModelPair
from fedpersona.trainer.rounds.records import RoundSpec, RunRecords, RunState
from support.processes import free_ports, started, wait_listening
from support.wheel import build_wheel, install_wheel, shadow_packages

pytestmark = [pytest.mark.flower, pytest.mark.slow]

USERS = {"alice": "pirate", "bob": "chef"}


def test_a_round_completes_on_superlink_and_two_supernodes(
    tmp_path: Path, micro_models: ModelPair
) -> None:
    run_deployment_round(tmp_path, micro_models)


def test_supernodes_run_fedpersona_from_an_installed_wheel(
    tmp_path: Path, micro_models: ModelPair
) -> None:
    site = install_wheel(build_wheel(tmp_path / "wheel"), tmp_path / "site")  # no bytecode yet
    fakes = shadow_packages(tmp_path / "shadow")
    run_deployment_round(tmp_path, micro_models, pythonpath=[fakes, site])
    # Evidence that the processes ran the wheel's copy: Python compiled it when they imported it.
    for module in ("trainer/flower/apps", "trainer/methods/pftt", "adapters/store"):
        folder, name = (site / "fedpersona" / module).parent, Path(module).name
        assert list((folder / "__pycache__").glob(f"{name}.*.pyc")), f"{module} not imported"


def run_deployment_round(
    tmp_path: Path, micro_models: ModelPair, *, pythonpath: list[Path] | None = None
) -> None:
    home = tmp_path / "home"
    write_silos(home / "silos", USERS, n_train=4, n_eval=2)
    flwr_home = tmp_path / "flwr" / ".flwr"
    env = flwr_env(flwr_home)
    env["HOME"] = str(flwr_home.parent)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in pythonpath)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    fleet, serverappio, control, io_a, io_b = free_ports(5)
    links = SuperLinkAddresses.on(
        "127.0.0.1", fleet=fleet, serverappio=serverappio, control=control
    )
    spec = RoundSpec(
        algorithm="pftt",
        rounds=1,
        users=tuple(USERS),
        local_steps=2,
        batch_size=2,
        max_len=64,
        rank=4,
    )
    status = RunRecords(home / "runs").create(spec, users=list(USERS))
    config = config_of(
        spec, run_id=status.id, home=home, users=tuple(USERS), base_model=micro_models.large.path
    )
    logs = tmp_path / "logs"
    logs.mkdir()

    with started(
        superlink_command(links, database=tmp_path / "state.db"),
        env=env,
        log=logs / "superlink.log",
    ) as link:
        wait_listening(control, timeout=60, proc=link)
        wait_listening(fleet, timeout=60, proc=link)
        with contextlib.ExitStack() as nodes:
            for user, port in zip(USERS, (io_a, io_b), strict=True):
                command = supernode_command(
                    superlink_fleet=links.fleet,
                    clientappio=f"127.0.0.1:{port}",
                    user=user,
                    silo=home / "silos" / user,
                )
                nodes.enter_context(started(command, env=env, log=logs / f"{user}.log"))
            final = submit(
                config,
                control=links.control,
                flwr_home=flwr_home,
                timeout=420,
                log_file=logs / "flwr-run.log",
            )

    diagnostics = "\n".join(
        f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.iterdir())
    )
    assert final.state == RunState.succeeded, f"{final.error}\n{diagnostics}"
    assert len(final.rounds) == 1
    record = final.rounds[0]
    assert {c.user for c in record.clients} == set(USERS)
    assert all(c.bytes_up > 0 and c.bytes_down > 0 for c in record.clients)
    store = AdapterStore(home / "store")
    assert store.current(Slot.global_adapter("pftt")).id == record.global_version  # type: ignore[union-attr]
    for user in USERS:
        served = store.current(Slot.user_served(user))
        assert served is not None and served.id == record.served_versions[user]
        assert load_lora(served.path).r == 4
        assert store.current(Slot.user_personal(user)) is not None  # published by the client
