"""A user's PFIT reward mix through the real gateway app and `fedpersona users reward-mix`.

The admin API and the CLI set it with one check and the same words; it lands in the store where
the trainer's clients read it (`fedpersona.adapters.preferences`), every user shown carries it,
a refused value changes nothing, and deleting a user takes it along. Real app, store and
registry; the engine is the fake one (no chat is involved).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from fedpersona.adapters.preferences import (
    DEFAULT_REWARD_MIX,
    effective_preferences,
    preferences_path,
    read_preferences,
    reward_mix_problem,
)
from fedpersona.service.commands.users import main as users_main
from gateway_harness import ADMIN_KEY, Gateway

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
JSON = {**ADMIN, "Content-Type": "application/json"}


def _patch(gw: Gateway, name: str, body: str) -> object:
    return gw.client.patch(f"/admin/users/{name}", content=body, headers=JSON)


def test_patch_sets_the_mix_where_the_trainer_reads_it(gw: Gateway) -> None:
    root = gw.store.root
    shown = gw.client.get("/admin/users/alice", headers=ADMIN).json()
    assert shown["reward_mix"] == DEFAULT_REWARD_MIX  # never set

    answer = _patch(gw, "alice", '{"reward_mix": 0.2}')
    assert answer.status_code == 200, answer.text
    assert answer.json()["reward_mix"] == 0.2 and answer.json()["proxy_alpha"] == 1.0
    assert effective_preferences(root, "alice").reward_mix == 0.2  # what a client reads
    assert gw.client.get("/admin/users/alice", headers=ADMIN).json()["reward_mix"] == 0.2
    listed = {
        u["name"]: u["reward_mix"] for u in gw.client.get("/admin/users", headers=ADMIN).json()
    }
    assert listed == {"alice": 0.2, "bob": DEFAULT_REWARD_MIX, "carol": DEFAULT_REWARD_MIX}

    both = _patch(gw, "alice", '{"reward_mix": 1, "proxy_alpha": 2.5}')
    assert both.status_code == 200
    assert (both.json()["reward_mix"], both.json()["proxy_alpha"]) == (1.0, 2.5)
    alpha_only = _patch(gw, "alice", '{"proxy_alpha": 3}')
    assert alpha_only.json()["reward_mix"] == 1.0  # a field not given stays
    assert _patch(gw, "carol", '{"reward_mix": 0}').json()["reward_mix"] == 0.0  # no adapter yet


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ("-0.1", "from 0 to 1, got -0.1"),
        ("1.5", "from 0 to 1, got 1.5"),
        ("1e999", "from 0 to 1, got inf"),
        ("NaN", "from 0 to 1, got nan"),
        ("-Infinity", "from 0 to 1, got -inf"),
        ('"0.5"', "valid number"),
        ("true", "valid number"),
        ("[0.5]", "valid number"),
    ],
)
def test_a_bad_mix_is_refused_in_the_openai_envelope_and_changes_nothing(
    gw: Gateway, raw: str, words: str
) -> None:
    _patch(gw, "alice", '{"reward_mix": 0.3}')
    answer = _patch(gw, "alice", f'{{"reward_mix": {raw}, "proxy_alpha": 2}}')
    assert answer.status_code in (400, 422), raw
    error = answer.json()["error"]
    assert error["param"] == "reward_mix" and error["type"] == "invalid_request_error"
    assert error["message"].startswith("reward_mix: ") and words in error["message"]
    user = gw.client.get("/admin/users/alice", headers=ADMIN).json()
    assert (user["reward_mix"], user["proxy_alpha"]) == (0.3, 1.0)  # neither field changed


def test_the_api_and_the_cli_say_the_same_words() -> None:
    problem = reward_mix_problem(1.5)
    assert problem == "must be a number from 0 to 1, got 1.5"


def test_nothing_to_change_unknown_fields_and_unknown_users(gw: Gateway) -> None:
    empty = _patch(gw, "alice", "{}")
    assert empty.status_code == 400
    assert "at least one of proxy_alpha, reward_mix" in empty.json()["error"]["message"]
    assert _patch(gw, "alice", '{"reward_mix": null}').status_code == 400
    assert _patch(gw, "alice", '{"lambda": 0.5}').status_code == 400
    missing = _patch(gw, "nobody", '{"reward_mix": 0.5}')
    assert missing.status_code == 404 and missing.json()["error"]["type"]
    assert not preferences_path(gw.store.root, "nobody").parent.exists()
    bad_name = _patch(gw, "..", '{"reward_mix": 0.5}')
    assert bad_name.status_code in (400, 404)
    anonymous = gw.client.patch("/admin/users/alice", json={"reward_mix": 0.5})
    assert anonymous.status_code == 401
    assert read_preferences(gw.store.root, "alice") is None


def test_an_unwritable_store_is_a_503_and_keeps_the_old_mix(
    gw: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedpersona.service import preferences

    _patch(gw, "alice", '{"reward_mix": 0.3}')

    def refuse(*_args: object, **_kwargs: object) -> Path:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(preferences, "write_preferences", refuse)
    answer = _patch(gw, "alice", '{"reward_mix": 0.9}')
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "store_unwritable"
    assert effective_preferences(gw.store.root, "alice").reward_mix == 0.3


def test_deleting_a_user_takes_the_mix_along_and_a_reused_name_starts_fresh(gw: Gateway) -> None:
    _patch(gw, "carol", '{"reward_mix": 0.9}')
    assert gw.client.delete("/admin/users/carol", headers=ADMIN).status_code == 200
    assert read_preferences(gw.store.root, "carol") is None
    again = gw.client.post(
        "/admin/users?reuse_deleted_name=true", json={"name": "carol"}, headers=ADMIN
    )
    assert again.status_code == 201
    assert again.json()["user"]["reward_mix"] == DEFAULT_REWARD_MIX


# ---- the CLI ---------------------------------------------------------------------------------


def test_cli_sets_shows_lists_and_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = ["--home", str(tmp_path)]
    assert users_main([*home, "add", "alice"]) == 0
    capsys.readouterr()
    assert users_main([*home, "reward-mix", "alice"]) == 0
    assert json.loads(capsys.readouterr().out) == {"user": "alice", "reward_mix": 0.5}
    assert users_main([*home, "reward-mix", "alice", "0.8"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out) == {"user": "alice", "reward_mix": 0.8}
    assert "0.8" in out.err
    assert effective_preferences(tmp_path / "store", "alice").reward_mix == 0.8  # trainer's view

    for bad in ("1.5", "-0.5", "nan", "inf", "half"):
        assert users_main([*home, "reward-mix", "alice", "--", bad]) == 2
        said = " ".join(capsys.readouterr().err.split())
        assert "from 0 to 1" in said, bad
    assert users_main([*home, "reward-mix", "nobody", "0.5"]) == 2
    assert "No such user" in capsys.readouterr().err
    assert users_main([*home, "reward-mix", "nobody"]) == 2
    assert not (tmp_path / "store" / "slots" / "users" / "nobody").exists()

    assert users_main([*home, "list", "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["reward_mix"] == 0.8 and listed["proxy_alpha"] == 1.0
    assert users_main([*home, "list"]) == 0
    assert "reward mix" in capsys.readouterr().out


# ---- a PATCH racing a DELETE -------------------------------------------------------------------


def _preferences_files(root: Path, name: str) -> dict[str, float]:
    """Every preferences file below the store for `name` (live or quarantined): path -> mix."""
    found = {}
    for path in root.rglob("preferences.json"):
        relative = path.relative_to(root).as_posix()
        if f"/{name}/" in f"/{relative}" or f"/{name}." in f"/{relative}":
            found[relative] = json.loads(path.read_text())["reward_mix"]
    return found


def test_a_delete_during_a_patch_waits_for_its_write_and_takes_the_file_along(
    gw: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedpersona.service import accounts, preferences

    root = gw.store.root
    real_write = preferences.write_preferences
    writer_excluded: list[bool] = []
    deletions: list[object] = []
    delete_thread: list[threading.Thread] = []

    def delete_carol() -> None:
        try:
            deletions.append(
                accounts.delete_user(
                    gw.registry, name="carol", store_root=root, silos=gw.settings.layout.silos
                )
            )
        except BaseException as e:  # asserted below
            deletions.append(e)

    def write_with_a_delete_racing(store_root: Path, user: str, prefs: object) -> Path:
        # Between the PATCH's check that carol exists and its write: no registry writer (the
        # delete's tombstone included) can get in now...
        probe = sqlite3.connect(gw.registry.path, timeout=0, isolation_level=None)
        try:
            probe.execute("BEGIN IMMEDIATE")
            writer_excluded.append(False)
            probe.execute("ROLLBACK")
        except sqlite3.OperationalError as e:
            writer_excluded.append("locked" in str(e))
        finally:
            probe.close()
        # ...and a delete started now goes after the write, whenever its thread runs.
        thread = threading.Thread(target=delete_carol)
        thread.start()
        delete_thread.append(thread)
        return real_write(store_root, user, prefs)  # type: ignore[arg-type]

    monkeypatch.setattr(preferences, "write_preferences", write_with_a_delete_racing)
    answer = _patch(gw, "carol", '{"reward_mix": 0.9}')
    (thread,) = delete_thread
    thread.join(timeout=60)
    assert not thread.is_alive()

    assert writer_excluded == [True]
    assert answer.status_code == 200, answer.text  # the PATCH came first...
    assert answer.json()["reward_mix"] == 0.9  # ...and answers what it wrote
    (deletion,) = deletions
    assert isinstance(deletion, accounts.Deletion), deletion
    # The deleted name keeps no preferences: the file went into the quarantine with the user.
    assert read_preferences(root, "carol") is None
    (moved,) = _preferences_files(root, "carol").items()
    assert moved[0].startswith(".quarantine/") and moved[1] == 0.9
    assert _patch(gw, "carol", '{"reward_mix": 0.1}').status_code == 404
    assert read_preferences(root, "carol") is None


def test_a_patch_after_the_tombstone_writes_nothing(
    gw: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedpersona.adapters import AdapterStore
    from fedpersona.service import accounts, preferences
    from fedpersona.service.registry import UserNotFound

    root = gw.store.root
    assert _patch(gw, "carol", '{"reward_mix": 0.9}').status_code == 200
    outcomes: list[str] = []

    class PatchBeforeQuarantine(AdapterStore):
        def quarantine_user(self, user: str, *, label: str) -> Any:
            # The delete committed its tombstone and has not moved the directory yet: the
            # PATCH's own check (the route's 404 check came before) finds no user.
            try:
                preferences.set_reward_mix(gw.registry, name=user, reward_mix=0.1, store_root=root)
                outcomes.append("written")
            except UserNotFound:
                outcomes.append("404")
            return super().quarantine_user(user, label=label)

    monkeypatch.setattr(accounts, "AdapterStore", PatchBeforeQuarantine)
    assert gw.client.delete("/admin/users/carol", headers=ADMIN).status_code == 200
    assert outcomes == ["404"]
    assert read_preferences(root, "carol") is None
    assert list(_preferences_files(root, "carol").values()) == [0.9]  # the quarantined one
