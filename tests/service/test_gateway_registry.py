"""The SQLite registry, the `fedpersona users` CLI, and settings validation."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from fedpersona.service.commands.users import main as users_main
from fedpersona.service.errors import BadRequest, Conflict, NotFound
from fedpersona.service.registry import KEY_PREFIX, Registry, UserExists, parse_key_id
from fedpersona.service.settings import Settings
from pydantic import ValidationError


def _all_bytes(path: Path) -> bytes:
    """The database and its WAL/shm side files: everything SQLite wrote."""
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))


def test_keys_are_stored_only_as_hashes(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry.sqlite")
    registry.create_user("alice")
    issued = registry.issue_key("alice")
    assert issued.api_key.startswith(KEY_PREFIX)
    secret = issued.api_key.split("_", 1)[1]
    data = _all_bytes(registry.path)
    assert issued.api_key.encode() not in data
    assert secret.encode() not in data
    with sqlite3.connect(registry.path) as db:
        (stored,) = db.execute("SELECT key_sha256 FROM api_keys").fetchone()
    assert stored == hashlib.sha256(issued.api_key.encode()).digest()
    assert stat.S_IMODE(os.stat(registry.path).st_mode) == 0o600


def test_authenticate(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "r.sqlite")
    registry.create_user("alice", proxy_alpha=0.3)
    key = registry.issue_key("alice").api_key
    user = registry.authenticate(key)
    assert user is not None and user.name == "alice" and user.proxy_alpha == 0.3
    assert registry.authenticate(key + "x") is None
    assert registry.authenticate(key[:-1]) is None
    assert registry.authenticate("") is None
    assert registry.authenticate(KEY_PREFIX + "zzzzzzzzzzzz_" + "a" * 43) is None


def test_key_ids_parse_strictly() -> None:
    good = "fp-0123456789ab_" + "A" * 43
    assert parse_key_id(good) == "0123456789ab"
    for bad in ("fp-0123456789ab" + "A" * 44, "fp-0123456789AB_" + "A" * 43, "fp-01_aaa", "x"):
        assert parse_key_id(bad) is None


def test_user_lifecycle_and_errors(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "r.sqlite")
    registry.create_user("alice")
    with pytest.raises(UserExists):
        registry.create_user("alice")
    for bad in ("Alice", "../bob", "", "a" * 64, "al ice", "ålice", "-x"):
        with pytest.raises(BadRequest):
            registry.create_user(bad)
    first = registry.issue_key("alice")
    second = registry.issue_key("alice")
    assert registry.get_user("alice").active_keys == 2
    registry.revoke_key(first.key_id)
    with pytest.raises(Conflict):
        registry.revoke_key(first.key_id)
    with pytest.raises(NotFound):
        registry.revoke_key("ffffffffffff")
    assert registry.authenticate(first.api_key) is None
    assert registry.authenticate(second.api_key) is not None
    assert registry.revoke_user_keys("alice") == 1
    assert registry.get_user("alice").active_keys == 0
    registry.delete_user("alice")
    assert registry.list_keys() == []  # cascaded
    with pytest.raises(NotFound):
        registry.delete_user("alice")
    with pytest.raises(NotFound):
        registry.issue_key("alice")


def test_users_cli_prints_key_once_and_stores_only_its_hash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = ["--home", str(tmp_path)]
    assert users_main([*home, "add", "alice"]) == 0
    added = capsys.readouterr()
    key = added.out.strip()
    assert key.startswith(KEY_PREFIX) and "\n" not in key
    assert "shown once" in added.err

    assert users_main([*home, "list"]) == 0
    listed = capsys.readouterr()
    assert "alice" in listed.out and key not in listed.out + listed.err
    assert users_main([*home, "keys", "--json"]) == 0
    keys_out = capsys.readouterr().out
    assert key not in keys_out and parse_key_id(key) in keys_out

    registry_file = tmp_path / "registry.sqlite"
    assert key.encode() not in _all_bytes(registry_file)
    assert Registry(registry_file).authenticate(key) is not None

    assert users_main([*home, "add", "alice"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert users_main([*home, "add", "Bad/Name"]) == 2
    assert "invalid user name" in capsys.readouterr().err

    assert users_main([*home, "revoke", str(parse_key_id(key))]) == 0
    assert Registry(registry_file).authenticate(key) is None
    assert users_main([*home, "issue", "alice"]) == 0
    second = capsys.readouterr().out.strip()
    assert users_main([*home, "revoke", "--user", "alice"]) == 0
    assert Registry(registry_file).authenticate(second) is None
    assert users_main([*home, "alpha", "alice", "0.25"]) == 0
    assert Registry(registry_file).get_user("alice").proxy_alpha == 0.25
    assert users_main([*home, "alpha", "alice", "-1"]) == 2
    assert users_main([*home, "delete", "alice"]) == 0
    assert Registry(registry_file).list_users() == []


def test_users_cli_key_is_scriptable_from_a_real_process(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fedpersona", "users", "--home", str(tmp_path), "add", "bob"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "FEDPERSONA_ENVIRONMENT": "development"},
    )
    key = result.stdout.strip()
    assert Registry(tmp_path / "registry.sqlite").authenticate(key) is not None


@pytest.mark.parametrize("key", ["", "changethis", "admin", "short-key"])
def test_settings_refuse_weak_admin_key_outside_development(key: str) -> None:
    with pytest.raises(ValidationError, match="admin_key"):
        Settings(environment="production", admin_key=key)  # type: ignore[arg-type]
    assert Settings(environment="development", admin_key=key).environment == "development"  # type: ignore[arg-type]


def test_settings_read_env_with_prefix_and_nesting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDPERSONA_ENVIRONMENT", "production")
    monkeypatch.setenv("FEDPERSONA_ADMIN_KEY", "k" * 32)
    monkeypatch.setenv("FEDPERSONA_HOME", "/srv/fp")
    monkeypatch.setenv("FEDPERSONA_ENGINE__URL", "http://vllm:8000")
    monkeypatch.setenv("FEDPERSONA_ENGINE__MAX_MODEL_LEN", "2048")
    monkeypatch.setenv("FEDPERSONA_RATE_LIMIT_RPM", "30")
    monkeypatch.setenv("FEDPERSONA_ENGINE__API_KEY", "e" * 32)
    settings = Settings()
    assert settings.engine.url == "http://vllm:8000" and settings.engine.max_model_len == 2048
    assert settings.engine_key == "e" * 32 and "e" * 32 not in repr(settings)
    assert settings.registry_file == Path("/srv/fp/registry.sqlite")
    assert settings.store_path == Path("/srv/fp/store")
    assert settings.rate_limit_rpm == 30
    assert "k" * 32 not in repr(settings)  # the secret never shows in logs
