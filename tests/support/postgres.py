"""A real PostgreSQL server for the tests: `initdb` into a temp dir, `pg_ctl start` on loopback.

`postgres_server` is a session-scoped fixture (imported by the conftest of the test packages that
use it): one server for the whole run, stopped at the end. Every test gets its own database from
`PostgresServer.new_database`, so tests never see each other's rows. The server binaries come
from PATH or Debian's `/usr/lib/postgresql/<major>/bin` (package `postgresql`, which `make
install` installs); when they are missing the fixture fails with that instruction instead of
skipping, so a CI machine without PostgreSQL cannot pass by testing less.

initdb refuses to run as root: as root, the server runs as the `postgres` user (or `nobody`).
Password authentication (scram-sha-256) over TCP on 127.0.0.1 only; fsync off (test data).
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from support.processes import free_ports

SUPERUSER = "fedpersona"
_BINARIES = ("initdb", "pg_ctl", "postgres")
DEBIAN_ROOT = Path("/usr/lib/postgresql")  # Debian's postgresql-<major> packages install here


def find_binaries() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres (PATH first, then Debian's layout)."""
    on_path = [shutil.which(b) for b in _BINARIES]
    if all(on_path):
        return Path(str(on_path[0])).resolve().parent
    debian = sorted(
        DEBIAN_ROOT.glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    for directory in reversed(debian):
        if all((directory / b).is_file() for b in _BINARIES):
            return directory
    return None


@dataclass
class PostgresServer:
    bindir: Path
    root: Path
    port: int
    password: str
    _databases: list[str] = field(default_factory=list)

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        name = f"t{secrets.token_hex(6)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self._databases.append(name)
        return self.url(name)

    def restart(self) -> None:
        """Stop (fast: open connections are cut) and start again on the same port."""
        subprocess.run(
            # -l: the server's output to its log, not to pipes this call would wait on.
            [
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.log_file),
                "-m",
                "fast",
                "-w",
                "restart",
            ],
            capture_output=True,
            cwd=self.root,
            check=True,
            timeout=120,
            user=_run_as().get("user"),
            group=_run_as().get("group"),
        )

    @property
    def log_file(self) -> Path:
        return self.root / "server.log"

    def log(self) -> str:
        path = self.log_file
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


def _run_as() -> dict[str, int]:
    if os.geteuid() != 0:
        return {}
    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return {"user": entry.pw_uid, "group": entry.pw_gid}
    raise RuntimeError("running as root and no 'postgres' or 'nobody' user to run PostgreSQL as")


def start_postgres(bindir: Path) -> PostgresServer:
    """initdb + pg_ctl start on a free loopback port (a few tries if the port gets taken)."""
    who = _run_as()
    # Short path: the Unix socket (in this dir) must fit in 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="fp-pg-"))
    password = secrets.token_urlsafe(16)
    (root / "pw").write_text(password)
    if who:
        for path in (root, root / "pw"):
            os.chown(path, who["user"], who["group"])
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    subprocess.run(
        [
            str(bindir / "initdb"),
            "-D",
            str(root / "data"),
            "-U",
            SUPERUSER,
            f"--pwfile={root / 'pw'}",
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ],
        check=True,
        capture_output=True,
        env=env,
        cwd=root,
        user=who.get("user"),
        group=who.get("group"),
    )
    last = ""
    for _ in range(3):
        (port,) = free_ports(1)
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=200"
        )
        proc = subprocess.run(
            [
                str(bindir / "pg_ctl"),
                "-D",
                str(root / "data"),
                "-l",
                str(root / "server.log"),
                "-o",
                options,
                "-w",
                "-t",
                "60",
                "start",
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=root,
            user=who.get("user"),
            group=who.get("group"),
        )
        if proc.returncode == 0:
            return PostgresServer(bindir=bindir, root=root, port=port, password=password)
        last = proc.stdout + proc.stderr + (root / "server.log").read_text(errors="replace")
    raise RuntimeError(f"PostgreSQL did not start:\n{last[-3000:]}")


def stop_postgres(server: PostgresServer) -> None:
    subprocess.run(
        [str(server.bindir / "pg_ctl"), "-D", str(server.data), "-m", "fast", "-w", "stop"],
        capture_output=True,
        cwd=server.root,
        check=False,
        timeout=60,
        user=_run_as().get("user"),
        group=_run_as().get("group"),
    )
    shutil.rmtree(server.root, ignore_errors=True)


def require_binaries() -> Path:
    """`find_binaries()`, or fail the test (never skip) saying how to install them."""
    bindir = find_binaries()
    if bindir is None:
        pytest.fail(
            "PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found on PATH or in "
            "/usr/lib/postgresql/<major>/bin. Install Debian's `postgresql` package "
            "(`make install` does: apt-get install -y postgresql); the registry tests need a "
            "real server and do not skip.",
            pytrace=False,
        )
    return bindir


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = start_postgres(require_binaries())
    try:
        yield server
    finally:
        stop_postgres(server)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh, empty database on the session's server."""
    return postgres_server.new_database()
