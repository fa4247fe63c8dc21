"""Authentication and authorization matrix, and the admin API."""

from __future__ import annotations

import httpx
import pytest
from gateway_harness import ADMIN_KEY, Gateway, GatewayFactory

ENVELOPE_KEYS = {"message", "type", "param", "code"}


def _chat(gw: Gateway, headers: dict[str, str]) -> httpx.Response:
    return gw.client.post(
        "/v1/chat/completions",
        json={"model": "personal", "messages": [{"role": "user", "content": "hi"}]},
        headers=headers,
    )


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Basic YWxpY2U6c2VjcmV0",
        "Bearer fp-000000000000_" + "x" * 43,  # well-formed, unknown
        "Bearer not-a-key",
        "Token KEY",
    ],
)
def test_missing_or_bad_key_is_401(gw: Gateway, header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    for response in (_chat(gw, headers), gw.client.get("/v1/models", headers=headers)):
        assert response.status_code == 401
        error = response.json()["error"]
        assert set(error) == ENVELOPE_KEYS
        assert error["type"] == "authentication_error"
    assert gw.engine.received == []


def test_tampered_secret_with_valid_key_id_is_401(gw: Gateway) -> None:
    key = gw.keys["alice"]
    tampered = key[:-1] + ("A" if key[-1] != "A" else "B")
    assert _chat(gw, {"Authorization": f"Bearer {tampered}"}).status_code == 401


def test_scheme_is_case_insensitive(gw: Gateway) -> None:
    response = _chat(gw, {"Authorization": f"bearer {gw.keys['alice']}"})
    assert response.status_code == 200


def test_revoked_key_and_deleted_user_are_401(gw: Gateway) -> None:
    (alice_key,) = gw.registry.list_keys("alice")
    gw.registry.revoke_key(alice_key.key_id)
    assert gw.chat("alice").status_code == 401
    gw.registry.delete_user("bob")
    assert gw.chat("bob").status_code == 401


def test_admin_routes_matrix(gw: Gateway) -> None:
    cases = {
        None: 401,
        "Bearer wrong-admin-key-0123456789abcdef": 401,
        f"Bearer {gw.keys['alice']}": 403,
        f"Bearer {ADMIN_KEY}": 200,
    }
    for header, expected in cases.items():
        headers = {} if header is None else {"Authorization": header}
        response = gw.client.get("/admin/users", headers=headers)
        assert response.status_code == expected, header
        if expected != 200:
            assert set(response.json()["error"]) == ENVELOPE_KEYS
    # The admin key is not a user key.
    assert _chat(gw, {"Authorization": f"Bearer {ADMIN_KEY}"}).status_code == 401


def test_admin_api_disabled_without_admin_key(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(admin_key="")
    response = gw.client.get("/admin/users", headers={"Authorization": "Bearer anything"})
    assert response.status_code == 403
    assert "disabled" in response.json()["error"]["message"]


def test_admin_user_and_key_lifecycle(gw: Gateway) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    created = gw.client.post(
        "/admin/users", json={"name": "dave", "proxy_alpha": 0.7}, headers=admin
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["user"] == {**body["user"], "name": "dave", "proxy_alpha": 0.7, "active_keys": 1}
    dave_key = body["key"]["api_key"]
    assert dave_key.startswith("fp-")
    headers = {"Authorization": f"Bearer {dave_key}"}
    assert _chat(gw, headers).status_code == 200

    again = gw.client.post("/admin/users", json={"name": "dave"}, headers=admin)
    assert again.status_code == 409
    bad = gw.client.post("/admin/users", json={"name": "Dave!"}, headers=admin)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "name"

    second = gw.client.post("/admin/users/dave/keys", headers=admin)
    assert second.status_code == 201
    keys = gw.client.get("/admin/users/dave/keys", headers=admin).json()
    assert len(keys) == 2 and all("api_key" not in k for k in keys)
    assert dave_key not in gw.client.get("/admin/users/dave/keys", headers=admin).text

    revoked = gw.client.delete(f"/admin/keys/{body['key']['key_id']}", headers=admin)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    assert _chat(gw, headers).status_code == 401
    assert (
        gw.client.delete(f"/admin/keys/{body['key']['key_id']}", headers=admin).status_code == 409
    )
    assert gw.client.delete("/admin/keys/ffffffffffff", headers=admin).status_code == 404

    patched = gw.client.patch("/admin/users/dave", json={"proxy_alpha": 2.0}, headers=admin)
    assert patched.status_code == 200 and patched.json()["proxy_alpha"] == 2.0

    assert gw.client.delete("/admin/users/dave", headers=admin).status_code == 200
    assert gw.client.get("/admin/users/dave", headers=admin).status_code == 404
    second_key = second.json()["api_key"]
    assert _chat(gw, {"Authorization": f"Bearer {second_key}"}).status_code == 401


@pytest.mark.parametrize("inline", [True, False])
def test_key_check_stays_on_the_loop_only_for_quick_reads(inline: bool) -> None:
    """SQLite's key check (~50 us) runs on the event loop, a database round trip in a thread."""
    import asyncio
    import threading

    from fedpersona.service.db import PostgresDatabase, SqliteDatabase
    from fedpersona.service.http.middleware import USER_STATE, AuthenticateFirst
    from fedpersona.service.registry import User

    assert SqliteDatabase.quick_reads and not PostgresDatabase.quick_reads
    threads: list[int] = []
    reached: list[User] = []

    def authenticate(token: str) -> User | None:
        threads.append(threading.get_ident())
        return User(name="alice", created_at=0.0, proxy_alpha=1.0) if token == "KEY" else None

    async def app(scope: dict, receive: object, send: object) -> None:
        reached.append(scope["state"][USER_STATE])

    def deny(token: str | None) -> None:
        raise AssertionError("not an admin path")

    middleware = AuthenticateFirst(
        app, authenticate_user=authenticate, check_admin=deny, authenticate_inline=inline
    )
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": [(b"authorization", b"Bearer KEY")],
    }

    async def call() -> int:
        await middleware(scope, None, None)  # type: ignore[arg-type]
        return threading.get_ident()

    loop_thread = asyncio.run(call())
    assert [u.name for u in reached] == ["alice"]
    assert (threads == [loop_thread]) is inline


def test_gateway_on_sqlite_checks_keys_on_the_loop(gw: Gateway) -> None:
    from fedpersona.service.http.middleware import AuthenticateFirst

    layer = gw.client.app.middleware_stack  # type: ignore[attr-defined]
    while layer is not None and not isinstance(layer, AuthenticateFirst):
        layer = getattr(layer, "app", None)
    assert layer is not None and layer._authenticate_inline
    assert gw.chat("alice").status_code == 200
