"""Secure aggregation on Flower's Deployment Engine: a real SuperLink and three real SuperNodes.

One SuperLink and three SuperNodes (alice, bob and mallory, a node whose user is not in the
round) run two one-round FedAvg runs from the same initial global: plain, then with
`secure-aggregation`. The ServerApp is the trainer's own (`build_server_app`) with an observer
that saves every train reply's upload as the server side receives it. Checked: in the secure run
mallory is refused at the key exchange (before any mask), the uploads the server received are
uint64 words spread over the whole range (nothing like the plain float32 uploads of the same
clients), and the published global equals the plain run's within the quantization bound. The
round time and bytes of both runs are printed (`-s`) and asserted loosely.

Cost: ~2-3 min (two runs; every stage starts ClientApp processes); marked slow.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from fedpersona.adapters import AdapterStore, Slot, load_lora
from fedpersona.trainer.data.personas import write_silos
from fedpersona.trainer.flower.deployment import (
    APP_DIR,
    CONNECTION,
    SuperLinkAddresses,
    bin_dir,
    flwr_env,
    superlink_command,
    supernode_command,
    write_connection,
    write_run_config,
)
from fedpersona.trainer.flower.runconfig import RunConfig, config_of
from fedpersona.trainer.flower.secagg import quantization_bound
from fedpersona.trainer.models.basemodel import ModelPair
from fedpersona.trainer.rounds.records import RoundSpec, RunRecords, RunState, RunStatus
from support.processes import free_ports, started, wait_listening

pytestmark = [pytest.mark.flower, pytest.mark.slow]

USERS = {"alice": "pirate", "bob": "chef", "mallory": "poet"}
ROUND = ("alice", "bob")  # mallory's node is connected but her user is not in the round

AUDIT_APP = '''
"""The trainer's ServerApp with an observer that saves what the server receives."""
import os
from pathlib import Path

import numpy as np
from fedpersona.trainer.flower.apps import build_server_app
from fedpersona.trainer.flower.packing import unpack


def _save(direction, message):
    if direction != "up" or message.metadata.message_type != "train":
        return
    if message.has_error() or "upload" not in message.content.array_records:
        return
    folder = Path(os.environ["FEDPERSONA_AUDIT"]) / str(message.metadata.run_id)
    folder.mkdir(parents=True, exist_ok=True)
    user = str(message.content.config_records["client"]["user"])
    np.savez(folder / f"{user}.npz", **unpack(message.content.array_records["upload"]))


server_app = build_server_app(observer=_save)
'''


def audited_app(folder: Path) -> Path:
    folder.mkdir()
    text = (APP_DIR / "pyproject.toml").read_text()
    text = text.replace(
        'serverapp = "fedpersona.trainer.flower.apps:server_app"',
        'serverapp = "secagg_audit:server_app"',
    )
    (folder / "pyproject.toml").write_text(text)
    (folder / "secagg_audit.py").write_text(AUDIT_APP)
    return folder


def submit(app: Path, config: RunConfig, *, control: str, flwr_home: Path, log: Path) -> RunStatus:
    write_connection(flwr_home, control=control)
    overrides = write_run_config(config, flwr_home / f"run-{config.run_id}.toml")
    env = flwr_env(flwr_home)
    env["HOME"] = str(flwr_home.parent)
    command = [str(bin_dir() / "flwr"), "run", str(app), CONNECTION]
    with open(log, "ab") as out:
        subprocess.run(
            [*command, "--run-config", str(overrides), "--stream"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=420,
            check=False,
        )
    return RunRecords(config.runs_dir).read(config.run_id)


def test_secure_round_masks_uploads_and_matches_the_plain_mean(
    tmp_path: Path, micro_models: ModelPair
) -> None:
    home = tmp_path / "home"
    write_silos(home / "silos", USERS, n_train=4, n_eval=2)
    flwr_home = tmp_path / "flwr" / ".flwr"
    env = flwr_env(flwr_home)
    env["HOME"] = str(flwr_home.parent)
    audit = tmp_path / "audit"
    env["FEDPERSONA_AUDIT"] = str(audit)
    app = audited_app(tmp_path / "app")
    fleet, serverappio, control, *io = free_ports(6)
    links = SuperLinkAddresses.on(
        "127.0.0.1", fleet=fleet, serverappio=serverappio, control=control
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    finals: dict[bool, RunStatus] = {}
    folders: dict[bool, Path] = {}

    with started(
        superlink_command(links, database=tmp_path / "state.db"),
        env=env,
        log=logs / "superlink.log",
    ) as link:
        wait_listening(control, timeout=60, proc=link)
        wait_listening(fleet, timeout=60, proc=link)
        with contextlib.ExitStack() as nodes:
            for user, port in zip(USERS, io, strict=False):
                command = supernode_command(
                    superlink_fleet=links.fleet,
                    clientappio=f"127.0.0.1:{port}",
                    user=user,
                    silo=home / "silos" / user,
                )
                nodes.enter_context(started(command, env=env, log=logs / f"{user}.log"))
            for secure in (False, True):
                spec = RoundSpec(
                    algorithm="fedavg",
                    rounds=1,
                    users=ROUND,
                    local_steps=2,
                    batch_size=2,
                    max_len=64,
                    rank=4,
                    secure_aggregation=secure,
                )
                status = RunRecords(home / "runs").create(spec, users=list(ROUND))
                config = config_of(
                    spec,
                    run_id=status.id,
                    home=home,
                    users=ROUND,
                    base_model=micro_models.large.path,
                    min_nodes=3,  # all three connected before the round starts
                    resume=False,  # both runs start from the same initial global
                )
                before = set(audit.iterdir()) if audit.exists() else set()
                finals[secure] = submit(
                    app,
                    config,
                    control=links.control,
                    flwr_home=flwr_home,
                    log=logs / "flwr-run.log",
                )
                new = set(audit.iterdir()) - before if audit.exists() else set()
                if len(new) == 1:
                    folders[secure] = new.pop()

    diagnostics = "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(logs.iterdir())
    )
    for secure, final in finals.items():
        assert final.state == RunState.succeeded, f"{secure}: {final.error}\n{diagnostics}"
    plain, secure = finals[False].rounds[0], finals[True].rounds[0]
    assert {c.user for c in plain.clients} == {c.user for c in secure.clients} == set(ROUND)
    # Mallory: refused after training in the plain run, at the key exchange in the secure one.
    assert any("mallory" in r for r in plain.refused)
    assert any(r.startswith("key exchange:") and "mallory" in r for r in secure.refused)

    # What the server side received from each client.
    received = {
        s: {u: dict(np.load(folders[s] / f"{u}.npz")) for u in ROUND} for s in (False, True)
    }
    assert set(received[True]["alice"]) == set(received[False]["alice"])
    for user in ROUND:
        clear, masked = received[False][user], received[True][user]
        assert all(v.dtype == np.float32 for v in clear.values())
        assert all(v.dtype == np.uint64 for v in masked.values())
        words = np.concatenate([masked[k].ravel() for k in sorted(masked)])
        # weight * quantized update < 2**30 unmasked; masked words cover [0, 2**64).
        assert (words < 2**40).mean() < 0.01
        assert 0.4 < (words >> np.uint64(63)).mean() < 0.6

    # The published globals agree within the quantization bound (float32 rounding on top).
    store = AdapterStore(home / "store")
    globals_ = {
        s: load_lora(store.get(Slot.global_adapter("fedavg"), r.global_version).path).tensors  # type: ignore[arg-type]
        for s, r in ((False, plain), (True, secure))
    }
    bound = quantization_bound(RoundSpec().secagg_range) + 1e-6
    errors = {
        k: float((globals_[True][k] - globals_[False][k]).abs().max()) for k in globals_[True]
    }
    assert max(errors.values()) <= bound, errors

    stats = secure.secure_aggregation or {}
    assert stats["bytes-up"] > 0 and stats["bytes-down"] > 0 and stats["wall-s"] > 0
    assert secure.bytes_up > plain.bytes_up
    print(
        "\nsecure aggregation overhead (1 round, 2 clients, micro model, FedAvg rank 4): "
        + json.dumps(
            {
                "plain": {
                    "wall_s": plain.wall_s,
                    "bytes_up": plain.bytes_up,
                    "bytes_down": plain.bytes_down,
                },
                "secure": {
                    "wall_s": secure.wall_s,
                    "bytes_up": secure.bytes_up,
                    "bytes_down": secure.bytes_down,
                    "stages": stats,
                },
                "max_global_error": max(errors.values()),
                "bound": bound,
            }
        )
    )
    shutil.rmtree(audit, ignore_errors=True)
