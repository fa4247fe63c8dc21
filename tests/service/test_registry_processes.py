"""Two real `fedpersona serve` processes on one PostgreSQL server: one set of users, one rate
limit, deletions seen at once; and a gateway that cannot reach its database stops with a clear
message that never shows the password. No engine is needed for these routes."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from support.postgres import PostgresServer
from support.processes import free_ports, started, wait_listening

ADMIN_KEY = "process-admin-key-0123456789abcdef"


def _env(database_url: str) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
        "FEDPERSONA_ENVIRONMENT": "development",
        "FEDPERSONA_DATABASE_URL": database_url,
        "FEDPERSONA_ADMIN_KEY": ADMIN_KEY,
        "FEDPERSONA_RATE_LIMIT_RPM": "6",  # one token every 10 s
        "FEDPERSONA_RATE_LIMIT_BURST": "2",
        "FEDPERSONA_ENGINE__SERVED_MODEL_NAME": "base",
    }


def _serve(home: Path, port: int, engine_port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fedpersona",
        "serve",
        "--home",
        str(home),
        "--port",
        str(port),
        "--engine-url",
        f"http://127.0.0.1:{engine_port}",  # nothing listens: these routes never ask it
        "--no-rounds",
    ]


def _call(port: int, method: str, path: str, key: str, body: Any = None) -> tuple[int, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


@pytest.fixture
def two_gateways(postgres_server: PostgresServer, tmp_path: Path) -> Iterator[tuple[int, int]]:
    url = postgres_server.new_database()
    a, b, engine = free_ports(3)
    with ExitStack() as stack:
        for name, port in (("a", a), ("b", b)):
            proc = stack.enter_context(
                started(
                    _serve(tmp_path / name, port, engine),
                    env=_env(url),
                    log=tmp_path / f"{name}.log",
                )
            )
            wait_listening(port, timeout=120, proc=proc)
        yield a, b


def test_two_gateway_processes_share_users_and_one_rate_limit(
    two_gateways: tuple[int, int],
) -> None:
    a, b = two_gateways
    status, created = _call(a, "POST", "/admin/users", ADMIN_KEY, {"name": "alice"})
    assert status == 201
    key = created["key"]["api_key"]
    # Created on A, known to B; alice's bucket of 2 is shared: B, A, then both refuse.
    assert _call(b, "GET", "/v1/models", key)[0] == 200
    assert _call(a, "GET", "/v1/models", key)[0] == 200
    limited, body = _call(a, "GET", "/v1/models", key)
    assert limited == 429 and body["error"]["code"] == "rate_limit_exceeded"
    assert _call(b, "GET", "/v1/models", key)[0] == 429
    # Deleted through B: A refuses her key on the next request, and her name stays taken.
    assert _call(b, "DELETE", "/admin/users/alice", ADMIN_KEY)[0] == 200
    assert _call(a, "GET", "/v1/models", key)[0] == 401
    status, refused = _call(a, "POST", "/admin/users", ADMIN_KEY, {"name": "alice"})
    assert status == 409 and refused["error"]["code"] == "user_name_deleted"


def test_a_gateway_without_its_database_stops_with_a_clear_message(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    url = postgres_server.url("no_such_database")
    port, engine = free_ports(2)
    log = tmp_path / "gateway.log"
    with started(_serve(tmp_path / "home", port, engine), env=_env(url), log=log) as proc:
        deadline = time.monotonic() + 90  # it waits 10 s for the server, then gives up
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert proc.returncode == 2
    said = log.read_text()
    assert "cannot connect to PostgreSQL" in said and "no_such_database" in said
    assert "Traceback" not in said  # one error line, not a crash
    assert postgres_server.password not in said
