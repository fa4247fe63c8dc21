"""Deleted users and re-created names (issue 13, defect 2); one validation for CLI and admin API.

The attack: delete carol, create a new carol; before the fix the new person was answered by
the adapter trained on the old carol's data. Here a deleted name is tombstoned, the old slots
are quarantined, re-creating the name is refused, and the explicit operator override starts
the name from a clean slate. Runs the real app, store and registry with the fake engine.
"""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import pytest
from fedpersona.adapters import Slot
from fedpersona.adapters.names import NAME_RULE
from fedpersona.service.commands.users import main as users_main
from fedpersona.service.errors import BadRequest
from fedpersona.service.registry import (
    SCHEMA_VERSION,
    NameDeleted,
    Registry,
    proxy_alpha_problem,
)
from gateway_harness import ADMIN_KEY, Gateway, GatewayFactory, engine_name, tiny_lora

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def _flat(text: str) -> str:
    """Terminal output with rich's line wrapping undone."""
    return " ".join(text.split())


def _recreate(gw: Gateway, name: str, *, reuse: bool = False) -> object:
    query = "?reuse_deleted_name=true" if reuse else ""
    return gw.client.post(f"/admin/users{query}", json={"name": name}, headers=ADMIN)


# ---- the attack, through the admin API ------------------------------------------------------


def test_recreated_name_is_never_served_the_deleted_users_adapter(
    make_gateway: GatewayFactory,
) -> None:
    gw = make_gateway(with_adapters=("alice", "bob", "carol"))
    old = gw.served["carol"]
    assert gw.chat("carol").status_code == 200
    assert gw.engine.last["model"] == engine_name(old)  # the old carol's adapter

    deleted = gw.client.delete("/admin/users/carol", headers=ADMIN)
    assert deleted.status_code == 200
    body = deleted.json()
    assert body["quarantined"] == ["users/carol/served"]
    assert body["quarantined_to"].startswith(".quarantine/carol.")
    assert body["user_id"] in body["quarantined_to"]
    assert "quarantined users/carol/served" in body["message"]
    assert gw.store.current(Slot.user_served("carol")) is None
    assert gw.store.current(Slot.user_served("alice")) == gw.served["alice"]  # others untouched

    refused = _recreate(gw, "carol")
    assert refused.status_code == 409
    error = refused.json()["error"]
    assert error["code"] == "user_name_deleted" and error["param"] == "name"
    assert "reuse_deleted_name" in error["message"]
    assert gw.client.get("/admin/users/carol", headers=ADMIN).status_code == 404

    reused = _recreate(gw, "carol", reuse=True)
    assert reused.status_code == 201
    gw.keys["carol"] = reused.json()["key"]["api_key"]
    assert gw.chat("carol").status_code == 200
    assert gw.engine.last["model"] == gw.settings.engine.served_model_name  # base, not old
    assert all(r["model"] != engine_name(old) for r in gw.engine.received[1:])
    assert gw.chat("alice").status_code == 200  # and everyone else is served as before
    assert gw.engine.last["model"] == engine_name(gw.served["alice"])


def test_reuse_clears_what_was_published_for_the_name_after_the_delete(
    make_gateway: GatewayFactory,
) -> None:
    gw = make_gateway(with_adapters=("alice", "carol"))
    assert gw.client.delete("/admin/users/carol", headers=ADMIN).status_code == 200
    # a round still holding the old carol's data publishes for the tombstoned name
    late = gw.store.publish_lora(Slot.user_served("carol"), tiny_lora(seed=9))
    reused = _recreate(gw, "carol", reuse=True)
    assert reused.status_code == 201
    assert gw.store.current(Slot.user_served("carol")) is None
    gw.keys["carol"] = reused.json()["key"]["api_key"]
    assert gw.chat("carol").status_code == 200
    assert gw.engine.last["model"] != engine_name(late)
    # after the reuse, a new publish for carol is the new carol's and is served
    fresh = gw.store.publish_lora(Slot.user_served("carol"), tiny_lora(seed=10))
    assert gw.chat("carol").status_code == 200
    assert gw.engine.last["model"] == engine_name(fresh)


def test_reuse_is_refused_while_the_old_users_silo_exists(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(with_adapters=("carol",))
    silo = gw.settings.layout.silo("carol")
    silo.mkdir(parents=True)
    (silo / "train.jsonl").write_text('{"messages": []}\n')
    deleted = gw.client.delete("/admin/users/carol", headers=ADMIN).json()
    assert str(silo) in deleted["message"]  # the answer says the data is still there
    refused = _recreate(gw, "carol", reuse=True)
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "user_name_not_clean"
    assert str(silo) in refused.json()["error"]["message"]
    (silo / "train.jsonl").unlink()
    silo.rmdir()
    assert _recreate(gw, "carol", reuse=True).status_code == 201


def test_deleting_a_user_without_adapters_says_so(gw: Gateway) -> None:
    body = gw.client.delete("/admin/users/carol", headers=ADMIN).json()
    assert body["quarantined"] == [] and body["quarantined_to"] is None
    assert "nothing in the store" in body["message"]
    assert gw.client.delete("/admin/users/carol", headers=ADMIN).status_code == 404


# ---- the same through the CLI ---------------------------------------------------------------


def test_cli_delete_quarantines_and_refuses_the_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedpersona.adapters import AdapterStore

    home = ["--home", str(tmp_path)]
    assert users_main([*home, "add", "carol"]) == 0
    old_key = capsys.readouterr().out.strip()
    store = AdapterStore(tmp_path / "store", max_rank=16)
    store.publish_lora(Slot.user_served("carol"), tiny_lora(seed=1))

    assert users_main([*home, "delete", "carol"]) == 0
    said = _flat(capsys.readouterr().err)
    assert "quarantined users/carol/served" in said and "--reuse-deleted-name" in said
    assert store.users() == []

    assert users_main([*home, "add", "carol"]) == 2
    said = _flat(capsys.readouterr().err)
    assert "belonged to a user deleted on" in said and "--reuse-deleted-name" in said

    assert users_main([*home, "add", "carol", "--reuse-deleted-name"]) == 0
    new_key = capsys.readouterr().out.strip()
    registry = Registry(tmp_path / "registry.sqlite")
    assert registry.authenticate(old_key) is None
    user = registry.authenticate(new_key)
    assert user is not None and user.name == "carol"
    (tombstone,) = registry.deleted("carol")
    assert tombstone.user_id != user.user_id and tombstone.reused_at is not None


def test_registry_tombstones_and_user_ids(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "r.sqlite")
    first = registry.create_user("carol")
    assert first.user_id and registry.get_user("carol").user_id == first.user_id
    tombstone = registry.delete_user("carol")
    assert (tombstone.name, tombstone.user_id) == ("carol", first.user_id)
    assert registry.is_deleted_name("carol")
    with pytest.raises(NameDeleted):
        registry.create_user("carol")
    second = registry.create_user("carol", reuse_deleted_name=True)
    assert second.user_id != first.user_id and not registry.is_deleted_name("carol")
    registry.delete_user("carol")
    assert [t.user_id for t in registry.deleted("carol")] == [first.user_id, second.user_id]
    with pytest.raises(NameDeleted):
        registry.create_user("carol")


# ---- an old registry file upgrades in place -------------------------------------------------

_VERSION_1 = """
CREATE TABLE users (
    name        TEXT PRIMARY KEY,
    created_at  REAL NOT NULL,
    proxy_alpha REAL NOT NULL DEFAULT 1.0
);
CREATE TABLE api_keys (
    key_id      TEXT PRIMARY KEY,
    user        TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    key_sha256  BLOB NOT NULL,
    created_at  REAL NOT NULL,
    revoked_at  REAL
);
CREATE INDEX api_keys_user ON api_keys(user);
"""


def test_a_version_1_registry_file_is_upgraded_in_place(tmp_path: Path) -> None:
    import hashlib

    path = tmp_path / "registry.sqlite"
    key = "fp-0123456789ab_" + "k" * 43
    with sqlite3.connect(path) as db:
        db.executescript(_VERSION_1)
        db.execute("INSERT INTO users VALUES ('alice', 1.0, 0.5), ('carol', 2.0, 1.0)")
        db.execute(
            "INSERT INTO api_keys VALUES ('0123456789ab', 'alice', ?, 1.0, NULL)",
            (hashlib.sha256(key.encode()).digest(),),
        )
    db.close()

    registry = Registry(path)
    alice = registry.authenticate(key)
    assert alice is not None and alice.proxy_alpha == 0.5 and alice.user_id
    users = registry.list_users()
    assert [u.name for u in users] == ["alice", "carol"]
    assert len({u.user_id for u in users}) == 2 and all(u.user_id for u in users)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()
    ids = {u.name: u.user_id for u in users}
    assert {u.name: u.user_id for u in Registry(path).list_users()} == ids  # reopen: no change
    registry.delete_user("carol")
    with pytest.raises(NameDeleted):
        Registry(path).create_user("carol")


# ---- one validation for the CLI and the admin API (issue 16, item 5) ------------------------

BAD_ALPHAS = ["-5", "1e9", "inf", "nan", "-inf"]


@pytest.mark.parametrize("text", BAD_ALPHAS)
def test_cli_refuses_bad_alpha_naming_the_flag_and_range(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    home = ["--home", str(tmp_path)]
    assert users_main([*home, "add", "x", f"--alpha={text}"]) == 2
    said = _flat(capsys.readouterr().err)
    assert "--alpha" in said and "from 0 to 10" in said and "already exists" not in said
    assert users_main([*home, "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []  # nothing was created
    assert users_main([*home, "add", "x"]) == 0
    capsys.readouterr()
    assert users_main([*home, "alpha", "x", "--", text]) == 2
    assert "from 0 to 10" in _flat(capsys.readouterr().err)
    assert users_main([*home, "list", "--json"]) == 0

    def strict(constant: str) -> None:
        raise AssertionError(f"not JSON: {constant}")

    listed = json.loads(capsys.readouterr().out, parse_constant=strict)
    assert listed[0]["proxy_alpha"] == 1.0


@pytest.mark.parametrize("raw", ["-5", "1e9", "1e999", "Infinity", "NaN", "-Infinity"])
def test_api_refuses_bad_alpha_with_the_same_words(gw: Gateway, raw: str) -> None:
    value = float(raw.replace("Infinity", "inf").replace("NaN", "nan"))
    problem = proxy_alpha_problem(value)
    assert problem is not None and "from 0 to 10" in problem
    headers = {**ADMIN, "Content-Type": "application/json"}
    for method, path, body in (
        ("POST", "/admin/users", f'{{"name": "x", "proxy_alpha": {raw}}}'),
        ("PATCH", "/admin/users/alice", f'{{"proxy_alpha": {raw}}}'),
    ):
        answer = gw.client.request(method, path, content=body, headers=headers)
        assert answer.status_code == 400, (method, raw)
        error = answer.json()["error"]
        assert error["param"] == "proxy_alpha"
        assert error["message"] == f"proxy_alpha: {problem}"
    assert gw.client.get("/admin/users/x", headers=ADMIN).status_code == 404
    assert gw.registry.get_user("alice").proxy_alpha == 1.0


def test_registry_itself_refuses_bad_alpha(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "r.sqlite")
    for bad in (-5.0, 1e9, math.inf, math.nan):
        with pytest.raises(BadRequest, match="from 0 to 10"):
            registry.create_user("x", proxy_alpha=bad)
    registry.create_user("x", proxy_alpha=10.0)
    with pytest.raises(BadRequest, match="from 0 to 10"):
        registry.set_proxy_alpha("x", math.nan)


def test_the_name_rule_reads_the_same_in_the_cli_and_the_api(
    gw: Gateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "a-z" in NAME_RULE and "0-9" in NAME_RULE
    assert users_main(["--home", str(tmp_path), "add", "Bad/Name"]) == 2
    said = _flat(capsys.readouterr().err)
    assert f"invalid user name 'Bad/Name': use {NAME_RULE}" in said
    answer = gw.client.post("/admin/users", json={"name": "Bad/Name"}, headers=ADMIN)
    assert answer.status_code == 400
    assert answer.json()["error"]["message"] == f"invalid user name 'Bad/Name': use {NAME_RULE}"
