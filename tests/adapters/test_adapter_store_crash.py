"""Publishing is atomic: SIGKILL a publisher anywhere and the store still serves a whole version.

Each trial forks a child that publishes a new adapter over the current one, kills it with
SIGKILL after a random delay, reopens the store (which cleans up after dead publishers) and
checks: the current version is either the old or the new adapter, complete and valid; every
version the store lists is complete (its files hash to its id and validate); nothing is left in
staging or trash. The child runs with `FEDPERSONA_STORE_TEST_STEP_DELAY` set in some trials, so
kills land inside every step of a publish (after the files are written, after the staging
directory is synced, between the version rename and the manifest swap, during retention), and
without it in others (kills at purely random points of an undelayed publish).

Trials go on until 50 children were killed before finishing (at most 400 trials). A fork, not a
fresh interpreter, keeps them to a few seconds: the child inherits the
imported modules. `test_killed_interpreter_publishers` does the same with real separate
Python processes, fewer times.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from factories_adapters import BASE, make_adapter
from fedpersona.adapters import AdapterStore, LoraAdapter, Slot, save_lora, validate_adapter_dir
from fedpersona.adapters.store import STEP_DELAY_ENV, content_id

SLOT = Slot.user_served("alice")
FILES = ("adapter_config.json", "adapter_model.safetensors")
KEEP = 3
KILLS = 50  # publishes interrupted by SIGKILL (children that finished first do not count)
MAX_TRIALS = 400  # a fast machine finishes many publishes before the kill lands
STEP_DELAYS = (0.0, 0.002, 0.005)


def content(path: Path) -> dict[str, bytes]:
    return {name: (path / name).read_bytes() for name in FILES}


class Pool:
    """Distinct adapters saved as source directories, indexed by their content id."""

    def __init__(self, root: Path, count: int) -> None:
        self.dirs: list[Path] = []
        self.by_id: dict[str, LoraAdapter] = {}
        for i in range(count):
            adapter = make_adapter(seed=1000 + i, r=2, targets=("q_proj", "v_proj"))
            path = save_lora(adapter, root / f"src-{i}")
            self.dirs.append(path)
            self.by_id[content_id(content(path))] = adapter

    def id_of(self, index: int) -> str:
        return content_id(content(self.dirs[index]))


def fork_publisher(root: Path, src: Path, *, step_delay: float) -> int:
    pid = os.fork()
    if pid == 0:  # child: publish, then leave without running any parent cleanup
        code = 1
        try:
            if step_delay:
                os.environ[STEP_DELAY_ENV] = str(step_delay)
            store = AdapterStore(root, keep_versions=KEEP)
            store.publish(SLOT, src, base_model=BASE, metadata={"src": src.name})
            code = 0
        finally:
            os._exit(code)
    return pid


def check_store(root: Path, pool: Pool, *, old: str, new: str) -> str:
    """Reopen the store and prove it is consistent; return 'old', 'new-committed' or 'new'."""
    store = AdapterStore(root, keep_versions=KEEP)
    current = store.current(SLOT)
    assert current is not None
    assert current.id in {old, new}, f"current {current.id} is neither old {old} nor new {new}"
    loaded = validate_adapter_dir(current.path, max_rank=16, base_model=BASE)
    expected = pool.by_id[current.id]
    assert loaded.tensors.keys() == expected.tensors.keys()
    for key, tensor in expected.tensors.items():
        assert torch.equal(loaded.tensors[key], tensor), key
    versions = store.versions(SLOT)
    assert current.id in {v.id for v in versions}
    # a crash between the version rename and retention may leave one extra version
    assert len(versions) <= KEEP + 1
    for version in versions:
        assert content_id(content(version.path)) == version.id, "partial version visible"
        validate_adapter_dir(version.path, max_rank=16, base_model=BASE)
    # nothing half-made hides next to the listed versions either
    on_disk = {p.name for p in (root / "slots" / SLOT.path / "versions").iterdir()}
    assert on_disk == {v.id for v in versions}, "unlisted directory among the versions"
    assert not [p for p in (root / ".staging").rglob("*") if p.is_file()], "staging leftovers"
    assert not list((root / ".trash").iterdir()), "trash leftovers"
    assert not list((root / "slots" / SLOT.path).glob(".current.json.*")), "temp manifest"
    if current.id == new:
        return "new"
    return "new-committed" if new in {v.id for v in versions} else "old"


def publish_duration(root: Path, pool: Pool, *, step_delay: float, index: int) -> float:
    started = time.monotonic()
    pid = fork_publisher(root, pool.dirs[index], step_delay=step_delay)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return time.monotonic() - started


def test_sigkilled_publishers_leave_a_complete_old_or_new_version(tmp_path: Path) -> None:
    rng = random.Random(20240611)
    pool = Pool(tmp_path, MAX_TRIALS + 1 + len(STEP_DELAYS))
    root = tmp_path / "store"
    AdapterStore(root, keep_versions=KEEP).publish(SLOT, pool.dirs[0], base_model=BASE)
    # how long an unkilled publish takes here, per step delay (these also fill up retention)
    durations = {
        delay: publish_duration(root, pool, step_delay=delay, index=i + 1)
        for i, delay in enumerate(STEP_DELAYS)
    }
    outcomes: dict[str, int] = {}
    killed = trials = 0
    while killed < KILLS and trials < MAX_TRIALS:
        index = 1 + len(STEP_DELAYS) + trials
        trials += 1
        old = AdapterStore(root, keep_versions=KEEP).current(SLOT).id  # type: ignore[union-attr]
        new = pool.id_of(index)
        delay = rng.choice(STEP_DELAYS)
        pid = fork_publisher(root, pool.dirs[index], step_delay=delay)
        time.sleep(rng.uniform(0.0, durations[delay]))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            killed += 1
            outcome = check_store(root, pool, old=old, new=new)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        else:
            assert os.waitstatus_to_exitcode(status) == 0
            assert check_store(root, pool, old=old, new=new) == "new"
    print(f"crash test: {trials} trials, {killed} killed, outcomes {outcomes}")
    assert killed >= KILLS, (trials, outcomes)
    # the kills landed before the commit, between commit and manifest swap, and after the swap
    assert outcomes.get("old", 0) >= 1, outcomes
    assert outcomes.get("new-committed", 0) + outcomes.get("new", 0) >= 1, outcomes


_CHILD = """
import sys
from fedpersona.adapters import AdapterStore, Slot
store = AdapterStore(sys.argv[1], keep_versions=int(sys.argv[3]))
print("ready", flush=True)
store.publish(Slot.parse(sys.argv[4]), sys.argv[2], base_model=sys.argv[5])
print("done", flush=True)
"""


@pytest.mark.slow
def test_killed_interpreter_publishers(tmp_path: Path) -> None:
    """Separate Python processes (not forks) killed mid-publish; 3 trials of ~4 s each."""
    rng = random.Random(7)
    pool = Pool(tmp_path, 4)
    root = tmp_path / "store"
    AdapterStore(root, keep_versions=KEEP).publish(SLOT, pool.dirs[0], base_model=BASE)
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, STEP_DELAY_ENV: "0.01", "PYTHONPATH": str(repo)}
    for index in range(1, 4):
        old = AdapterStore(root).current(SLOT).id  # type: ignore[union-attr]
        args = [str(root), str(pool.dirs[index]), str(KEEP), SLOT.path, BASE]
        with subprocess.Popen(
            [sys.executable, "-c", _CHILD, *args], stdout=subprocess.PIPE, text=True, env=env
        ) as child:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.0, 0.08))
            child.send_signal(signal.SIGKILL)
            child.wait()
        check_store(root, pool, old=old, new=pool.id_of(index))
