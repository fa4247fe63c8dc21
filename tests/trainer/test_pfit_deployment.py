"""PFIT on Flower's Deployment Engine: a real SuperLink and two SuperNodes on loopback.

Each SuperNode is one user's silo; the reward models sit beside the base model in the home
(`<home>/models/rewards`), where every client finds them; each user's reward mix is in their
silo. The round must publish the global and both users' composed adapters, and the run record
must carry each client's lambda.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest
from fedpersona.adapters import AdapterStore, Slot, load_lora
from fedpersona.adapters.preferences import Preferences, write_preferences
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

pytestmark = [pytest.mark.flower, pytest.mark.slow]

USERS = {"alice": ("pirate", 1.0), "bob": ("chef", 0.0)}


def test_pfit_round_on_superlink_and_two_supernodes(
    tmp_path: Path, micro_models: ModelPair
) -> None:
    from fedpersona.trainer.models.rewards import MICRO_REWARDS, build_reward_models

    home = tmp_path / "home"
    shutil.copytree(micro_models.large.path, home / "models" / "large")
    build_reward_models(home / "models" / "rewards", MICRO_REWARDS)
    silos = write_silos(home / "silos", {u: p for u, (p, _) in USERS.items()}, n_train=4, n_eval=2)
    for user, (_, lam) in USERS.items():  # as the gateway writes them (admin API, CLI)
        write_preferences(home / "store", user, Preferences(reward_mix=lam))
    flwr_home = tmp_path / "flwr" / ".flwr"
    env = flwr_env(flwr_home)
    env["HOME"] = str(flwr_home.parent)
    fleet, serverappio, control, io_a, io_b = free_ports(5)
    links = SuperLinkAddresses.on(
        "127.0.0.1", fleet=fleet, serverappio=serverappio, control=control
    )
    spec = RoundSpec(
        algorithm="pfit", rounds=1, users=tuple(USERS), local_steps=2, max_len=64, rank=4
    )
    status = RunRecords(home / "runs").create(spec, users=list(USERS))
    config = config_of(spec, run_id=status.id, home=home, users=tuple(USERS))
    logs = tmp_path / "logs"
    logs.mkdir()
    with started(
        superlink_command(links, database=tmp_path / "state.db"), env=env, log=logs / "link.log"
    ) as link:
        wait_listening(control, timeout=60, proc=link)
        wait_listening(fleet, timeout=60, proc=link)
        with contextlib.ExitStack() as nodes:
            for user, port in zip(USERS, (io_a, io_b), strict=True):
                command = supernode_command(
                    superlink_fleet=links.fleet,
                    clientappio=f"127.0.0.1:{port}",
                    user=user,
                    silo=silos[user],
                )
                nodes.enter_context(started(command, env=env, log=logs / f"{user}.log"))
            final = submit(
                config, control=links.control, flwr_home=flwr_home, timeout=480,
                log_file=logs / "flwr-run.log",
            )  # fmt: skip
    diagnostics = "\n".join(
        f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.iterdir())
    )
    assert final.state == RunState.succeeded, f"{final.error}\n{diagnostics}"
    (record,) = final.rounds
    assert {c.user: c.metrics["reward-mix"] for c in record.clients} == {
        u: lam for u, (_, lam) in USERS.items()
    }
    store = AdapterStore(home / "store")
    assert store.current(Slot.global_adapter("pfit")).id == record.global_version  # type: ignore[union-attr]
    for user in USERS:
        served = store.current(Slot.user_served(user))
        assert served is not None and served.id == record.served_versions[user]
        assert load_lora(served.path).r == 4  # global rank 2 + personal rank 2, composed
        assert store.current(Slot.user_personal(user)) is not None
