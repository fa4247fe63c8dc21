"""One training run at a time per home, and which users a run trains.

`RunLock` is an `fcntl.flock` on `<runs dir>/.lock`, held by the process that runs the rounds
for the whole run (the CLI child the controller starts, or a `fedpersona train` in a shell). The
kernel drops it when that process dies, so a crashed run never leaves the home locked.
`resolve_users` turns a run's `users` (or "all") into the users whose silos exist.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from fedpersona.adapters import InvalidName, validate_user_id
from fedpersona.trainer.errors import NoSilo, RoundBusy

LOCK_FILE = ".lock"


class RunLock:
    """Exclusive, non-blocking: `with RunLock(runs_dir): ...` or raises `RoundBusy`."""

    def __init__(self, runs_dir: Path) -> None:
        self.path = Path(runs_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            os.close(fd)
            raise RoundBusy(
                f"a training run is already in progress (it holds {self.path}; started by "
                "`fedpersona train` or POST /admin/rounds): wait for it to end "
                "(GET /admin/rounds shows it), then start this one"
            ) from e
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def held_elsewhere(self) -> bool:
        """True if some other open file description holds the lock right now."""
        try:
            self.acquire()
        except RoundBusy:
            return True
        self.release()
        return False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def silo_dir(home: Path, user: str) -> Path:
    return Path(home) / "silos" / user


def resolve_users(home: Path, users: tuple[str, ...] | list[str] | None) -> list[str]:
    """The users a run trains: `users` (each must have a silo) or every silo under `home`."""
    if users is None:
        root = Path(home) / "silos"
        found = []
        if root.is_dir():
            for entry in sorted(root.iterdir()):
                try:
                    validate_user_id(entry.name)
                except InvalidName:
                    continue
                if (entry / "train.jsonl").is_file():
                    found.append(entry.name)
        if not found:
            raise NoSilo(f"no user silos with a train.jsonl under {root}")
        return found
    missing = [u for u in users if not (silo_dir(home, u) / "train.jsonl").is_file()]
    if missing:
        raise NoSilo(f"no silo with a train.jsonl for {', '.join(missing)} under {home}/silos")
    return list(users)
