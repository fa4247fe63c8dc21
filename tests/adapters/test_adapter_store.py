"""`AdapterStore`: publish/current round trips, content ids, idempotence, retention, recovery.

Crash safety under SIGKILL has its own module (`test_adapter_store_crash.py`).
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from pathlib import Path

import pytest
import torch
from factories_adapters import BASE, TARGETS, make_adapter
from fedpersona.adapters import (
    AdapterError,
    AdapterStore,
    InvalidAdapter,
    InvalidName,
    NotFound,
    ReadOnlyStore,
    Slot,
    StoreCorrupt,
    load_lora,
    save_lora,
    validate_adapter_dir,
)
from fedpersona.adapters.store import content_id
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ALICE = Slot.user_served("alice")
FILES = ("adapter_config.json", "adapter_model.safetensors")
PROPERTY = settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def files_of(path: Path) -> dict[str, bytes]:
    return {name: (path / name).read_bytes() for name in FILES}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def staging_leftovers(root: Path) -> list[Path]:
    return [p for p in (root / ".staging").rglob("*") if p.is_file() or p.parent.name != ".staging"]


@PROPERTY
@given(
    seed=st.integers(0, 2**16),
    r=st.sampled_from([1, 2, 4, 8]),
    targets=st.sets(st.sampled_from(TARGETS), min_size=1),
    round_=st.integers(0, 10**6),
)
def test_publish_then_current_round_trips(
    tmp_path_factory: pytest.TempPathFactory,
    seed: int,
    r: int,
    targets: set[str],
    round_: int,
) -> None:
    store = AdapterStore(tmp_path_factory.mktemp("store"), max_rank=8)
    adapter = make_adapter(seed=seed, r=r, targets=sorted(targets))
    published = store.publish_lora(ALICE, adapter, metadata={"round": round_, "algo": "pftt"})
    current = store.current(ALICE)
    assert current == published
    assert (current.rank, current.base_model, current.slot) == (r, BASE, ALICE)
    assert current.metadata == {"round": round_, "algo": "pftt"}
    assert current.target_modules == tuple(sorted(targets))
    assert current.id == content_id(files_of(current.path))
    loaded = validate_adapter_dir(current.path, max_rank=8, base_model=BASE)
    assert_same_tensors(dict(loaded.tensors), dict(adapter.tensors))
    assert loaded.alpha == adapter.alpha


@PROPERTY
@given(seed=st.integers(0, 2**16), other=st.integers(0, 2**16))
def test_content_id_is_a_function_of_the_content(
    tmp_path_factory: pytest.TempPathFactory, seed: int, other: int
) -> None:
    tmp = tmp_path_factory.mktemp("ids")
    first = save_lora(make_adapter(seed=seed, r=2), tmp / "first")
    again = save_lora(make_adapter(seed=seed, r=2), tmp / "again")
    os.utime(again / FILES[1], (0, 0))
    different = save_lora(make_adapter(seed=other, r=2), tmp / "different")
    assert content_id(files_of(first)) == content_id(files_of(again))
    assert (content_id(files_of(first)) == content_id(files_of(different))) == (seed == other)
    store = AdapterStore(tmp / "store")
    by_dir = store.publish(ALICE, first, base_model=BASE, metadata={"n": 1})
    by_lora = store.publish_lora(ALICE, make_adapter(seed=seed, r=2), metadata={"n": 2})
    assert by_dir.id == by_lora.id == content_id(files_of(first))
    assert len(by_dir.id) == 16
    assert int(by_dir.id, 16) >= 0


def test_content_id_separates_names_from_bytes() -> None:
    assert content_id({"a": b"bc"}) != content_id({"ab": b"c"})
    assert content_id({"a": b"", "b": b"x"}) != content_id({"a": b"x", "b": b""})


def test_republishing_identical_content_is_idempotent_and_becomes_current(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path, keep_versions=5)
    a = store.publish_lora(ALICE, make_adapter(seed=1, r=2), metadata={"round": 1})
    b = store.publish_lora(ALICE, make_adapter(seed=2, r=2), metadata={"round": 2})
    assert store.current(ALICE) == b
    again = store.publish_lora(ALICE, make_adapter(seed=1, r=2), metadata={"round": 3})
    assert again == a  # same id, same (first) metadata: the version never changes
    assert store.current(ALICE) == a
    assert [v.id for v in store.versions(ALICE)] == [a.id, b.id]


@PROPERTY
@given(keep=st.integers(1, 4), count=st.integers(1, 8))
def test_retention_keeps_exactly_the_newest(
    tmp_path_factory: pytest.TempPathFactory, keep: int, count: int
) -> None:
    root = tmp_path_factory.mktemp("retention")
    store = AdapterStore(root, keep_versions=keep)
    ids = [
        store.publish_lora(ALICE, make_adapter(seed=i, r=1, layers=[0])).id for i in range(count)
    ]
    versions = store.versions(ALICE)
    assert [v.id for v in versions] == ids[-keep:]
    assert [v.seq for v in versions] == list(range(1, count + 1))[-keep:]
    assert store.current(ALICE) == versions[-1]
    assert versions[-1].id == ids[-1]
    on_disk = {p.name for p in (root / "slots" / ALICE.path / "versions").iterdir()}
    assert on_disk == set(ids[-keep:])
    assert not list((root / ".trash").iterdir())


def test_retention_is_per_slot(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path, keep_versions=1)
    bob = Slot.user_served("bob")
    store.publish_lora(ALICE, make_adapter(seed=1, r=1))
    kept = store.publish_lora(bob, make_adapter(seed=2, r=1))
    store.publish_lora(ALICE, make_adapter(seed=3, r=1))
    assert store.versions(bob) == [kept]


def test_retention_never_removes_the_current_version(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path, keep_versions=2)
    ids = [store.publish_lora(ALICE, make_adapter(seed=i, r=1)).id for i in range(3)]
    back = store.publish_lora(ALICE, make_adapter(seed=1, r=1))  # roll back to the middle one
    assert back.id == ids[1]
    assert store.current(ALICE) == back
    assert {v.id for v in store.versions(ALICE)} == {ids[1], ids[2]}


def test_publish_copies_only_the_adapter_files(tmp_path: Path) -> None:
    src = save_lora(make_adapter(seed=4, r=2), tmp_path / "src")
    (src / "README.md").write_text("PEFT writes a model card too")
    store = AdapterStore(tmp_path / "store")
    version = store.publish(ALICE, src, base_model=BASE)
    assert sorted(p.name for p in version.path.iterdir()) == sorted([*FILES, "version.json"])
    # the version is a copy: changing the source afterwards changes nothing
    save_lora(make_adapter(seed=5, r=2), src)
    assert version.id == content_id(files_of(version.path))
    record = json.loads((version.path / "version.json").read_text())
    assert record["slot"] == ALICE.path
    assert record["id"] == version.id
    assert record["rank"] == 2
    assert record["files"].keys() == set(FILES)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("rank", "above the configured maximum rank 4"),
        ("base", "does not match the expected base model"),
        ("missing", "adapter_model.safetensors: missing"),
        ("metadata", "JSON-serializable"),
        ("not_dir", "not a directory"),
    ],
)
def test_refused_publish_changes_nothing(tmp_path: Path, case: str, message: str) -> None:
    store = AdapterStore(tmp_path / "store", max_rank=4)
    before = store.publish_lora(ALICE, make_adapter(seed=1, r=2))
    src = save_lora(make_adapter(seed=2, r=8 if case == "rank" else 2), tmp_path / "src")
    kwargs: dict[str, object] = {"base_model": "other" if case == "base" else BASE}
    if case == "missing":
        (src / FILES[1]).unlink()
    if case == "metadata":
        kwargs["metadata"] = {"bad": object()}
    if case == "not_dir":
        src = tmp_path / "nothing"
    with pytest.raises(InvalidAdapter, match=message):
        store.publish(ALICE, src, **kwargs)  # type: ignore[arg-type]
    assert store.current(ALICE) == before
    assert store.versions(ALICE) == [before]
    assert staging_leftovers(tmp_path / "store") == []


def test_empty_slot(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    assert store.current(ALICE) is None
    assert store.versions(ALICE) == []
    assert store.users() == []
    with pytest.raises(NotFound):
        store.get(ALICE, "0123456789abcdef")


@pytest.mark.parametrize("bad", ["", "../../etc/passwd", "0123456789ABCDEF", "0123", "x" * 16])
def test_get_refuses_malformed_ids(tmp_path: Path, bad: str) -> None:
    with pytest.raises(InvalidName):
        AdapterStore(tmp_path).get(ALICE, bad)


def test_get_finds_older_versions(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    old = store.publish_lora(ALICE, make_adapter(seed=1, r=1))
    store.publish_lora(ALICE, make_adapter(seed=2, r=1))
    assert store.get(ALICE, old.id) == old


def test_users_and_slots(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    adapter = make_adapter(seed=1, r=1)
    store.publish_lora(Slot.user_served("alice"), adapter)
    store.publish_lora(Slot.user_personal("bob"), adapter)
    store.publish_lora(Slot.user_expert("bob"), make_adapter(seed=1, r=1, base_model="small"))
    store.publish_lora(Slot.global_adapter("pftt"), adapter)
    store.publish_lora(Slot.global_expert(), adapter)
    # stray directories are ignored, not returned
    stray = tmp_path / "slots" / "users" / "Eve" / "served"
    stray.mkdir(parents=True)
    (stray / "current.json").write_text("{}")
    assert store.users() == ["alice", "bob"]
    assert [s.path for s in store.slots()] == [
        "global/adapters/pftt",
        "global/expert",
        "users/alice/served",
        "users/bob/expert",
        "users/bob/personal",
    ]


def test_each_publish_checks_its_own_base_model(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    expert = save_lora(make_adapter(seed=1, r=1, base_model="small"), tmp_path / "expert")
    assert store.publish(Slot.user_expert("a"), expert, base_model="small").base_model == "small"
    with pytest.raises(InvalidAdapter, match="base model"):
        store.publish(Slot.user_served("a"), expert, base_model="large")


def test_corrupt_manifest_is_reported(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    store.publish_lora(ALICE, make_adapter(seed=1, r=1))
    manifest = tmp_path / "slots" / ALICE.path / "current.json"
    manifest.write_text('{"version": "00000000000000ff"}')
    with pytest.raises(StoreCorrupt, match="missing version"):
        store.current(ALICE)
    manifest.write_text("{")
    with pytest.raises(StoreCorrupt, match="unreadable manifest"):
        store.current(ALICE)


def test_opening_removes_stale_staging_but_not_a_live_publishers(tmp_path: Path) -> None:
    AdapterStore(tmp_path).publish_lora(ALICE, make_adapter(seed=1, r=1))
    stale = tmp_path / ".staging" / "users.alice.served" / "deadbeef"
    stale.mkdir(parents=True)
    (stale / "adapter_model.safetensors").write_bytes(b"half")
    temp_manifest = tmp_path / "slots" / ALICE.path / ".current.json.abc.tmp"
    temp_manifest.write_text("{")
    live = tmp_path / ".staging" / "users.bob.served" / "cafe"
    live.mkdir(parents=True)
    (tmp_path / ".trash" / "x").mkdir()
    lock = os.open(tmp_path / ".locks" / "users.bob.served.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # bob's publisher is alive (held in this process)
        store = AdapterStore(tmp_path)
    finally:
        os.close(lock)
    assert not stale.exists()
    assert not temp_manifest.exists()
    assert live.exists()
    assert not list((tmp_path / ".trash").iterdir())
    assert store.current(ALICE) is not None


def test_concurrent_publishers_serialise(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path, keep_versions=3)
    adapters = [make_adapter(seed=i, r=2) for i in range(8)]
    errors: list[BaseException] = []

    def publish(adapter_index: int) -> None:
        try:
            AdapterStore(tmp_path, keep_versions=3).publish_lora(ALICE, adapters[adapter_index])
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    versions = store.versions(ALICE)
    assert len(versions) == 3
    assert [v.seq for v in versions] == [6, 7, 8]
    assert store.current(ALICE) == versions[-1]
    for version in versions:
        loaded = load_lora(version.path)
        assert version.id == content_id(files_of(version.path))
        assert any(
            all(torch.equal(loaded.tensors[k], a.tensors[k]) for k in a.tensors) for a in adapters
        )


def test_store_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep_versions"):
        AdapterStore(tmp_path, keep_versions=0)
    with pytest.raises(ValueError, match="max_rank"):
        AdapterStore(tmp_path, max_rank=0)
    with pytest.raises(InvalidName):
        AdapterStore(tmp_path).current("users/alice/served")  # type: ignore[arg-type]


def test_an_incomplete_version_directory_is_replaced(tmp_path: Path) -> None:
    adapter = make_adapter(seed=1, r=1)
    src = save_lora(adapter, tmp_path / "src")
    damaged = tmp_path / "store" / "slots" / ALICE.path / "versions" / content_id(files_of(src))
    damaged.mkdir(parents=True)
    (damaged / FILES[0]).write_text("{")  # e.g. someone copied a version by hand, partly
    store = AdapterStore(tmp_path / "store")
    assert store.versions(ALICE) == []
    version = store.publish(ALICE, src, base_model=BASE)
    assert version.path == damaged
    validate_adapter_dir(version.path, max_rank=16, base_model=BASE)


def test_read_only_store_reads_but_never_writes(tmp_path: Path) -> None:
    writer = AdapterStore(tmp_path / "store")
    published = writer.publish_lora(ALICE, make_adapter(seed=1, r=1))
    stale = tmp_path / "store" / ".staging" / "users.alice.served" / "x"
    stale.mkdir(parents=True)
    reader = AdapterStore(tmp_path / "store", read_only=True)
    assert reader.current(ALICE) == published
    assert reader.users() == ["alice"]
    assert stale.exists()  # cleaning up is a writer's job
    with pytest.raises(AdapterError, match="read-only"):
        reader.publish_lora(ALICE, make_adapter(seed=2, r=1))
    missing = AdapterStore(tmp_path / "nothing", read_only=True)
    assert missing.current(ALICE) is None
    assert missing.slots() == []
    assert not (tmp_path / "nothing").exists()


def test_read_only_store_takes_no_locks_and_names_the_refused_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = AdapterStore(tmp_path / "store")
    src = tmp_path / "src"
    save_lora(make_adapter(seed=1, r=1), src)
    published = writer.publish(ALICE, src, base_model=BASE)
    (tmp_path / "store" / ".trash" / "leftover").mkdir()

    def no_lock(*args: object) -> None:
        raise AssertionError("a read-only store took a lock")

    monkeypatch.setattr(fcntl, "flock", no_lock)
    reader = AdapterStore(tmp_path / "store", read_only=True)
    assert reader.current(ALICE) == published and reader.current_id(ALICE) == published.id
    assert reader.versions(ALICE) == [published]
    with pytest.raises(ReadOnlyStore, match="read-only: cannot publish to users/alice/served"):
        reader.publish(ALICE, src, base_model=BASE)
    assert isinstance(ReadOnlyStore(), AdapterError)
    assert (tmp_path / "store" / ".trash" / "leftover").exists()
    assert sorted(p.name for p in (tmp_path / "store" / ".locks").iterdir()) == [
        "users.alice.served.lock"  # the writer's, from its publish
    ]


def test_current_id_rereads_only_a_changed_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedpersona.adapters.store as store_module

    store = AdapterStore(tmp_path)
    reader = AdapterStore(tmp_path, read_only=True)
    assert reader.current_id(ALICE) is None
    v1 = store.publish_lora(ALICE, make_adapter(seed=1, r=1))
    reads: list[Path] = []
    real_read = store_module._read_manifest

    def counting_read(manifest: Path) -> str | None:
        reads.append(manifest)
        return real_read(manifest)

    monkeypatch.setattr(store_module, "_read_manifest", counting_read)
    assert [reader.current_id(ALICE) for _ in range(3)] == [v1.id] * 3
    assert len(reads) == 1  # one read, then one stat per call
    v2 = store.publish_lora(ALICE, make_adapter(seed=2, r=1))  # same second: a new inode
    reads.clear()
    assert [reader.current_id(ALICE) for _ in range(3)] == [v2.id] * 3
    assert len(reads) == 1
    assert reader.current_id(Slot.user_served("bob")) is None


def test_current_id_refuses_a_corrupt_manifest(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    store.publish_lora(ALICE, make_adapter(seed=1, r=1))
    manifest = tmp_path / "slots" / ALICE.path / "current.json"
    manifest.write_text(json.dumps({"version": "../../etc"}))
    with pytest.raises(StoreCorrupt, match="invalid version id"):
        store.current_id(ALICE)
    manifest.write_text("{")
    with pytest.raises(StoreCorrupt, match="unreadable manifest"):
        store.current_id(ALICE)


def test_current_rereads_the_manifest_when_retention_wins_the_race(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = AdapterStore(tmp_path, keep_versions=1)
    old = store.publish_lora(ALICE, make_adapter(seed=1, r=1))
    real_get = AdapterStore.get
    calls: list[str] = []

    def get_after_a_publish(self: AdapterStore, slot: Slot, version_id: str) -> object:
        if not calls:  # another publisher lands between the manifest read and this lookup
            calls.append(version_id)
            monkeypatch.setattr(AdapterStore, "get", real_get)
            AdapterStore(tmp_path, keep_versions=1).publish_lora(ALICE, make_adapter(seed=2, r=1))
        return real_get(self, slot, version_id)

    monkeypatch.setattr(AdapterStore, "get", get_after_a_publish)
    current = store.current(ALICE)
    assert calls == [old.id]
    assert current is not None and current.id != old.id
    assert store.versions(ALICE) == [current]


def test_versions_are_hashable_values(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    version = store.publish_lora(ALICE, make_adapter(seed=1, r=1), metadata={"a": [1, 2]})
    assert {version: 1}[store.current(ALICE)] == 1  # type: ignore[index]
    assert "AdapterStore(" in repr(store)


# ---- quarantine ---------------------------------------------------------------------------


def test_quarantine_moves_every_slot_of_a_user_out_of_serving(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    adapter = make_adapter(seed=1, r=1)
    store.publish_lora(Slot.user_served("carol"), adapter)
    store.publish_lora(Slot.user_personal("carol"), make_adapter(seed=2, r=1))
    store.publish_lora(Slot.user_expert("carol"), make_adapter(seed=3, r=1, base_model="small"))
    kept = store.publish_lora(Slot.user_served("alice"), adapter)
    assert store.current_id(Slot.user_served("carol")) is not None  # cached id, dropped below

    moved = store.quarantine_user("carol", label="u0123abcd")

    assert moved.slots == ("users/carol/served", "users/carol/personal", "users/carol/expert")
    assert moved.path is not None and moved.path.parent == tmp_path / ".quarantine"
    assert moved.path.name.startswith("carol.") and moved.path.name.endswith(".u0123abcd")
    assert (moved.path / "served" / "current.json").is_file()  # kept whole, for an audit
    for slot in (Slot.user_served("carol"), Slot.user_personal("carol")):
        assert store.current(slot) is None and store.current_id(slot) is None
        assert store.versions(slot) == []
    assert store.users() == ["alice"]
    assert store.current(Slot.user_served("alice")) == kept
    # a fresh reader (another process) sees the same; reopening does not bring anything back
    assert AdapterStore(tmp_path, read_only=True).users() == ["alice"]
    assert AdapterStore(tmp_path).users() == ["alice"]
    # the name starts from an empty slot: its first version has seq 1 again
    assert store.publish_lora(Slot.user_served("carol"), adapter).seq == 1


def test_quarantine_of_a_user_without_slots_changes_nothing(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    moved = store.quarantine_user("nobody", label="u1")
    assert moved.slots == () and moved.path is None
    assert not (tmp_path / ".quarantine").exists()


def test_quarantine_refuses_bad_names_and_read_only_stores(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    store.publish_lora(Slot.user_served("carol"), make_adapter(seed=1, r=1))
    with pytest.raises(InvalidName):
        store.quarantine_user("../carol", label="u1")
    with pytest.raises(InvalidName):
        store.quarantine_user("carol", label="../x")
    with pytest.raises(ReadOnlyStore):
        AdapterStore(tmp_path, read_only=True).quarantine_user("carol", label="u1")
    assert store.users() == ["carol"]


def test_quarantine_waits_for_a_publish_in_progress(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    store.publish_lora(Slot.user_served("carol"), make_adapter(seed=1, r=1))
    done = threading.Event()
    holder = AdapterStore(tmp_path)
    with holder._lock(Slot.user_personal("carol")):  # a publisher mid-way on one slot
        worker = threading.Thread(
            target=lambda: (store.quarantine_user("carol", label="u1"), done.set())
        )
        worker.start()
        assert not done.wait(0.3)
        assert store.users() == ["carol"]
    worker.join(5)
    assert done.is_set() and store.users() == []
