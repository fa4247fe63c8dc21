"""The adapter store: immutable, content-addressed adapter versions per slot, published atomically.

Layout below the store root (one directory tree; on Kubernetes a ReadWriteMany volume):

    slots/<slot path>/versions/<id>/    one version: adapter_config.json,
                                        adapter_model.safetensors (a PEFT dir vLLM loads as is)
                                        and version.json (slot, id, seq, created_at, base_model,
                                        rank, target_modules, file hashes, publisher metadata)
    slots/<slot path>/current.json      {"version": "<id>"}: the version to serve
    slots/users/<user>/preferences.json the user's training preferences (`preferences.py`)
    .staging/<slot key>/<random>/       versions being written (slot key: path with "/" -> ".")
    .trash/                             versions being deleted by retention
    .quarantine/<user>.<stamp>.<label>/ a deleted user's slots (served, personal, expert),
                                        moved out whole by `quarantine_user`; never read again
    .locks/<slot key>.lock              one flock per slot, held by its publisher
    published.json                      the latest publish (slot, id): replaced after each
                                        `current.json` swap, a hint for readers (`announce.py`)

A version id is the first 16 hex digits of a SHA-256 over the adapter files' names and bytes,
so publishing the same content twice gives the same id (the second publish only makes it
current again; its metadata is the first one's). A version directory never changes after
publish.

Publishing (under the slot's lock): copy the files into a fresh staging directory, validate
the staged copy, hash it, write version.json, fsync every file and the directory, rename it to
`versions/<id>` (atomic), fsync `versions/`, then write `current.json` to a temporary file,
fsync it, `os.replace` it over the old one and fsync the slot directory. A crash at any step
leaves either the old `current.json` pointing at a complete old version, or the new one
pointing at a complete new version; staging leftovers are removed the next time the store is
opened (only for slots whose lock nobody holds). The fsync and atomic-replace primitives live
in `durable.py`, the version record and id function in `version.py`.

Retention keeps the current version plus the newest others, `keep_versions` in all; it runs
before and after each publish, so a publisher killed after committing its version but before
swapping the manifest leaves at most one version more than that. Deleting renames the
version into `.trash/` first, so a reader sees a version either whole or not at
all; readers (the gateway handing a path to vLLM) must load a version promptly after reading
`current()`, and retry with `current()` if it has gone (only versions at least
`keep_versions` publishes old can go).

Reading (`current`, `current_id`, `get`, `versions`, `slots`, `users`) needs no torch: the
LoRA and validation modules are imported only when publishing, so the gateway, which only
reads, never loads them. `current_id` is the cheap "has this slot's current version changed"
check: `current.json` is always replaced by `os.replace` (a new inode), so one `stat` tells
whether the id read last time is still current.

Quarantining a user (`quarantine_user`, when the gateway deletes them) takes the locks of the
user's three slots, so no publish is half done, and renames `slots/users/<user>` into
`.quarantine/` in one step: readers see the slots whole or gone, and the name starts from an
empty store. Nothing here reads `.quarantine/` again; an operator removes it when no longer
needed for an audit.

Locks are `fcntl.flock`, which works between processes on one machine and on most local
filesystems; on network filesystems without flock support run one publisher per slot.
Test hook: if the environment variable `FEDPERSONA_STORE_TEST_STEP_DELAY` is set to a number
of seconds, publishing sleeps that long between its steps so that crash tests can kill a
publisher inside each window. It is read at each step and is never set in production.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpersona.adapters.announce import announce
from fedpersona.adapters.durable import ensure_dir, fsync_dir, fsync_file, write_json_atomic
from fedpersona.adapters.errors import (
    InvalidAdapter,
    InvalidName,
    NotFound,
    ReadOnlyStore,
    StoreCorrupt,
)
from fedpersona.adapters.limits import MAX_LORA_RANK
from fedpersona.adapters.names import Slot, validate_adapter_name, validate_user_id
from fedpersona.adapters.version import (
    VERSION_FILE,
    Version,
    check_version_id,
    content_id,
    version_from_record,
)

if TYPE_CHECKING:
    from fedpersona.adapters.lora import LoraAdapter

logger = logging.getLogger(__name__)

STEP_DELAY_ENV = "FEDPERSONA_STORE_TEST_STEP_DELAY"
CURRENT_FILE = "current.json"
_MANIFEST_PATHS_KEPT = 100_000  # bounds `AdapterStore._manifests` (~200 bytes a slot)
_FORMAT = 1
_CURRENT_ATTEMPTS = 5


class AdapterStore:
    """Publish and read adapter versions below `root` (created if missing).

    Opening a writable store removes what crashed publishers left behind. With
    `read_only=True` (the gateway, the logits processor) it creates nothing, cleans nothing,
    takes no locks and refuses to publish (`ReadOnlyStore`); the root need not exist yet.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        max_rank: int = MAX_LORA_RANK,
        keep_versions: int = 5,
        read_only: bool = False,
    ) -> None:
        if max_rank < 1:
            raise ValueError(f"max_rank must be at least 1, got {max_rank}")
        if keep_versions < 1:
            raise ValueError(f"keep_versions must be at least 1, got {keep_versions}")
        self.root = Path(root)
        self.max_rank = max_rank
        self.keep_versions = keep_versions
        self._slots = self.root / "slots"
        self._staging = self.root / ".staging"
        self._trash = self.root / ".trash"
        self._locks = self.root / ".locks"
        self._quarantine = self.root / ".quarantine"
        self.read_only = read_only
        # slot path -> (stat stamp of its current.json, the version id it named)
        self._current_ids: dict[str, tuple[tuple[int, int, int], str]] = {}
        # Slot path -> its manifest's path as text: `current_id` is on the request path, and two
        # `Path` joins cost it more than its `stat`.
        self._manifests: dict[str, str] = {}
        if read_only:  # e.g. a serving pod with the volume mounted read-only: no writes at all
            return
        for directory in (self._slots, self._staging, self._trash, self._locks):
            directory.mkdir(parents=True, exist_ok=True)
        self._recover()

    def __repr__(self) -> str:
        mode = ", read_only=True" if self.read_only else ""
        return (
            f"AdapterStore({str(self.root)!r}, max_rank={self.max_rank}, "
            f"keep_versions={self.keep_versions}{mode})"
        )

    # ----------------------------------------------------------------------------- reading

    def current(self, slot: Slot) -> Version | None:
        """The version `slot` serves now, or None if nothing was ever published there."""
        manifest = self._slot_dir(slot) / CURRENT_FILE
        seen = None
        for _ in range(_CURRENT_ATTEMPTS):
            version_id = _read_manifest(manifest)
            if version_id is None:
                return None
            try:
                return self.get(slot, version_id)
            except (NotFound, InvalidName) as e:
                # Other publishers may have moved on (and retention removed this one) between
                # reading the manifest and the version: read again, unless nothing changed.
                if version_id == seen:
                    raise StoreCorrupt(
                        f"{manifest}: points at missing version {version_id!r}"
                    ) from e
                seen = version_id
        raise StoreCorrupt(f"{manifest}: changed {_CURRENT_ATTEMPTS} times while being read")

    def current_id(self, slot: Slot) -> str | None:
        """The id of the version `slot` serves now, or None; one `stat` while it is unchanged.

        Cheaper than `current` (which also reads the version's record): use it to tell whether
        a version read earlier is still current, and call `current` only when the id changed.
        """
        manifest = self._manifests.get(slot.path) if isinstance(slot, Slot) else None
        if manifest is None:
            manifest = str(self._slot_dir(slot) / CURRENT_FILE)
            if len(self._manifests) < _MANIFEST_PATHS_KEPT:
                self._manifests[slot.path] = manifest
        try:
            st = os.stat(manifest)
        except FileNotFoundError:
            self._current_ids.pop(slot.path, None)
            return None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._current_ids.get(slot.path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        version_id = _read_manifest(Path(manifest))
        if version_id is None:
            return None
        try:
            check_version_id(version_id)
        except InvalidName as e:
            raise StoreCorrupt(f"{manifest}: {e}") from e
        self._current_ids[slot.path] = (stamp, version_id)
        return version_id

    def get(self, slot: Slot, version_id: str) -> Version:
        """The version `version_id` of `slot`; raises `NotFound` (or `InvalidName`)."""
        check_version_id(version_id)
        path = self._slot_dir(slot) / "versions" / version_id
        try:
            data = json.loads((path / VERSION_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise NotFound(f"slot {slot.path} has no version {version_id}") from e
        except (OSError, ValueError) as e:
            raise StoreCorrupt(f"{path / VERSION_FILE}: unreadable: {e}") from e
        return version_from_record(slot, path, data)

    def versions(self, slot: Slot) -> list[Version]:
        """All retained versions of `slot`, oldest first (at most `keep_versions`)."""
        directory = self._slot_dir(slot) / "versions"
        found = []
        with contextlib.suppress(FileNotFoundError):
            for entry in directory.iterdir():
                with contextlib.suppress(NotFound, InvalidName):  # deleted meanwhile / foreign
                    found.append(self.get(slot, entry.name))
        return sorted(found, key=lambda v: v.seq)

    def slots(self) -> list[Slot]:
        """Every slot that has a current version, sorted by path."""
        found = []
        patterns = ("users/*/*", "global/adapters/*", "global/expert")
        manifests = [m for p in patterns for m in self._slots.glob(f"{p}/{CURRENT_FILE}")]
        for manifest in manifests:
            relative = manifest.parent.relative_to(self._slots).as_posix()
            try:
                found.append(Slot.parse(relative))
            except InvalidName:
                logger.warning("ignoring unexpected directory %s in the store", manifest.parent)
        return sorted(found, key=lambda s: s.path)

    def user_dir(self, user: str) -> Path:
        """`slots/users/<user>`: all the store keeps for `user` (`quarantine_user` moves it)."""
        return self._slots / "users" / validate_user_id(user)

    def users(self) -> list[str]:
        """Users that have at least one published slot, sorted."""
        return sorted({s.user for s in self.slots() if s.user is not None})

    # ----------------------------------------------------------------------------- publishing

    def publish(
        self,
        slot: Slot,
        src_dir: str | Path,
        *,
        base_model: str,
        metadata: dict[str, Any] | None = None,
    ) -> Version:
        """Publish the PEFT directory `src_dir` as the new current version of `slot`.

        Only adapter_config.json and adapter_model.safetensors are copied. The staged copy is
        validated (`validate_adapter_dir` with this store's `max_rank` and `base_model`) before
        anything becomes visible; on `InvalidAdapter` the store is unchanged.
        """
        from fedpersona.adapters.lora import ADAPTER_FILES  # torch: only when publishing

        src = Path(src_dir)
        if not src.is_dir():
            raise InvalidAdapter(f"{src}: not a directory")

        def copy_files(staging: Path) -> None:
            for name in ADAPTER_FILES:
                try:
                    data = (src / name).read_bytes()
                except FileNotFoundError as e:
                    raise InvalidAdapter(f"{src / name}: missing (a PEFT adapter needs it)") from e
                (staging / name).write_bytes(data)

        return self._publish(slot, copy_files, base_model=base_model, metadata=metadata)

    def publish_lora(
        self, slot: Slot, adapter: LoraAdapter, *, metadata: dict[str, Any] | None = None
    ) -> Version:
        """Write `adapter` as PEFT files and publish them (base model: `adapter.base_model`)."""
        from fedpersona.adapters.lora import save_lora  # torch: only when publishing

        return self._publish(
            slot,
            lambda staging: save_lora(adapter, staging),
            base_model=adapter.base_model,
            metadata=metadata,
        )

    def _publish(
        self,
        slot: Slot,
        write_files: Callable[[Path], object],
        *,
        base_model: str,
        metadata: dict[str, Any] | None,
    ) -> Version:
        if self.read_only:
            raise ReadOnlyStore(f"{self!r} is read-only: cannot publish to {slot.path}")
        metadata = dict(metadata or {})
        try:
            json.dumps(metadata, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise InvalidAdapter(f"publish metadata must be JSON-serializable: {e}") from e
        slot_dir = self._slot_dir(slot)
        with self._lock(slot):
            # Trim first too: publishers killed between commit and manifest swap leave extra
            # versions behind, and this bounds them to one at any time.
            previous = self._current_id(slot)
            if previous is not None:
                self._apply_retention(slot, keep=previous)
            staging = self._staging / _slot_key(slot) / uuid.uuid4().hex
            staging.mkdir(parents=True)
            try:
                version = self._stage_and_commit(
                    slot, staging, write_files, base_model=base_model, metadata=metadata
                )
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            _step("version committed")
            if previous != version.id:
                write_json_atomic(
                    slot_dir / CURRENT_FILE,
                    {"version": version.id},
                    before_replace=lambda: _step("manifest written"),
                )
                _step("current swapped")
                announce(self.root, slot, version.id)  # one stat tells readers: see announce.py
            self._apply_retention(slot, keep=version.id)
        logger.info("published %s@%s", slot.path, version.id)
        return version

    def _stage_and_commit(
        self,
        slot: Slot,
        staging: Path,
        write_files: Callable[[Path], object],
        *,
        base_model: str,
        metadata: dict[str, Any],
    ) -> Version:
        # torch: only when publishing (readers, e.g. the gateway, never load it)
        from fedpersona.adapters.lora import ADAPTER_FILES
        from fedpersona.adapters.validation import validate_adapter_dir

        write_files(staging)
        _step("files written")
        adapter = validate_adapter_dir(staging, max_rank=self.max_rank, base_model=base_model)
        files = {name: (staging / name).read_bytes() for name in ADAPTER_FILES}
        version_id = content_id(files)
        target = self._slot_dir(slot) / "versions" / version_id
        if (target / VERSION_FILE).is_file():
            return self.get(slot, version_id)
        existing = self.versions(slot)
        record = {
            "format": _FORMAT,
            "slot": slot.path,
            "id": version_id,
            "seq": max((v.seq for v in existing), default=0) + 1,
            "created_at": datetime.now(UTC).isoformat(),
            "base_model": adapter.base_model,
            "rank": adapter.r,
            "lora_alpha": adapter.alpha,
            "target_modules": list(adapter.target_modules),
            "files": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()},
            "metadata": metadata,
        }
        (staging / VERSION_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        for name in (*ADAPTER_FILES, VERSION_FILE):
            fsync_file(staging / name)
        fsync_dir(staging)
        _step("staging synced")
        ensure_dir(target.parent)
        if target.exists():  # no version.json: not made by publish (renames are atomic)
            logger.warning("replacing incomplete version directory %s", target)
            self._discard(slot, target)
        os.rename(staging, target)
        fsync_dir(target.parent)
        return version_from_record(slot, target, record)

    # ----------------------------------------------------------------------------- quarantine

    def quarantine_user(self, user: str, *, label: str) -> Quarantined:
        """Move every slot of `user` out of the store in one rename; return what was moved.

        Under the locks of the user's slots, `slots/users/<user>` becomes
        `.quarantine/<user>.<UTC stamp>.<label>`: nothing in it is served or listed again, and a
        later publish for the same name starts an empty slot. `label` (e.g. the deleted user's
        immutable id) makes the directory traceable; it must be a valid name. A user with no
        slots leaves the store unchanged (`path` is None).
        """
        if self.read_only:
            raise ReadOnlyStore(f"{self!r} is read-only: cannot quarantine user {user!r}")
        slots = [Slot.user_served(user), Slot.user_personal(user), Slot.user_expert(user)]
        validate_adapter_name(label)
        user_dir = self._slots / "users" / user
        with contextlib.ExitStack() as held:
            for slot in slots:  # a fixed order; publishers hold one slot lock at a time
                held.enter_context(self._lock(slot))
            if not user_dir.exists():
                return Quarantined(user=user, slots=(), path=None)
            had_versions = tuple(
                s.path for s in slots if (self._slot_dir(s) / CURRENT_FILE).exists()
            )
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
            target = self._quarantine / f"{user}.{stamp}.{label}"
            ensure_dir(self._quarantine)
            os.rename(user_dir, target)
            fsync_dir(user_dir.parent)
            fsync_dir(self._quarantine)
            for slot in slots:
                self._current_ids.pop(slot.path, None)
        logger.info("quarantined %s's slots %s into %s", user, had_versions, target)
        return Quarantined(user=user, slots=had_versions, path=target)

    # ----------------------------------------------------------------------------- retention

    def _apply_retention(self, slot: Slot, *, keep: str) -> None:
        versions = self.versions(slot)
        kept = {keep}
        for version in reversed(versions):
            if len(kept) >= self.keep_versions:
                break
            kept.add(version.id)
        doomed = [v for v in versions if v.id not in kept]
        for version in doomed:
            self._discard(slot, version.path)
            logger.info("retention removed %s@%s", slot.path, version.id)
        if doomed:
            fsync_dir(self._slot_dir(slot) / "versions")

    def _discard(self, slot: Slot, path: Path) -> None:
        """Delete a version directory so that readers see it whole or not at all."""
        grave = self._trash / f"{_slot_key(slot)}.{path.name}.{uuid.uuid4().hex}"
        os.rename(path, grave)
        _step("version moved to trash")
        shutil.rmtree(grave, ignore_errors=True)

    # ----------------------------------------------------------------------------- internals

    def _slot_dir(self, slot: Slot) -> Path:
        if not isinstance(slot, Slot):
            raise InvalidName(f"expected a Slot, got {type(slot).__name__}")
        return self._slots / slot.path

    def _current_id(self, slot: Slot) -> str | None:
        current = self.current(slot)
        return current.id if current else None

    @contextlib.contextmanager
    def _lock(self, slot: Slot, *, blocking: bool = True) -> Iterator[bool]:
        path = self._locks / f"{_slot_key(slot)}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _recover(self) -> None:
        """Remove what crashed publishers left behind (staging dirs, temp manifests, trash)."""
        for entry in list(self._staging.iterdir()):
            try:
                slot = Slot.parse(entry.name.replace(".", "/"))
            except InvalidName:
                logger.warning("ignoring unexpected entry %s in staging", entry)
                continue
            with self._lock(slot, blocking=False) as acquired:
                if not acquired:
                    continue  # a live publisher owns it
                for leftover in list(entry.iterdir()):
                    logger.info("removing stale staging directory %s", leftover)
                    shutil.rmtree(leftover, ignore_errors=True)
                for temp in self._slot_dir(slot).glob(f".{CURRENT_FILE}.*.tmp"):
                    temp.unlink(missing_ok=True)
        for grave in list(self._trash.iterdir()):
            shutil.rmtree(grave, ignore_errors=True)


@dataclass(frozen=True)
class Quarantined:
    """What `AdapterStore.quarantine_user` moved: slots that had a current version, and where."""

    user: str
    slots: tuple[str, ...]
    path: Path | None


def _read_manifest(manifest: Path) -> str | None:
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise StoreCorrupt(f"{manifest}: unreadable manifest: {e}") from e
    version_id = data.get("version") if isinstance(data, dict) else None
    if not isinstance(version_id, str):
        raise StoreCorrupt(f"{manifest}: unreadable manifest: no 'version' string")
    return version_id


def _slot_key(slot: Slot) -> str:
    return slot.path.replace("/", ".")


def _step(name: str) -> None:
    delay = os.environ.get(STEP_DELAY_ENV)
    if delay:
        logger.debug("test hook: sleeping %s s after %s", delay, name)
        time.sleep(float(delay))
