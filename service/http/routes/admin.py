"""`/admin/users` and `/admin/keys`: create and delete users, issue and revoke API keys.

Every route needs the admin key (`fedpersona.service.http.auth.AdminAccess`). The raw API key
appears only in
the response that issues it; the registry keeps its hash.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, status
from fedpersona.service.http.auth import AdminAccess
from fedpersona.service.http.protocol import (
    IssuedKeyOut,
    KeyOut,
    UserCreate,
    UserCreated,
    UserOut,
    UserUpdate,
)
from fedpersona.service.http.routes.deps import ServicesDep
from fedpersona.service.registry import IssuedKey, KeyInfo, User, check_user_name

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminAccess])


def _user(user: User) -> UserOut:
    return UserOut(
        name=user.name,
        created_at=user.created_at,
        proxy_alpha=user.proxy_alpha,
        active_keys=user.active_keys,
    )


def _key(key: KeyInfo) -> KeyOut:
    return KeyOut(
        key_id=key.key_id, user=key.user, created_at=key.created_at, revoked_at=key.revoked_at
    )


def _issued(key: IssuedKey) -> IssuedKeyOut:
    return IssuedKeyOut(key_id=key.key_id, user=key.user, api_key=key.api_key)


@router.post("/users", status_code=status.HTTP_201_CREATED)
async def create_user(body: UserCreate, services: ServicesDep) -> UserCreated:
    registry = services.registry
    check_user_name(body.name)
    await asyncio.to_thread(registry.create_user, body.name, proxy_alpha=body.proxy_alpha)
    issued = await asyncio.to_thread(registry.issue_key, body.name) if body.issue_key else None
    user = await asyncio.to_thread(registry.get_user, body.name)
    return UserCreated(user=_user(user), key=_issued(issued) if issued else None)


@router.get("/users")
async def list_users(services: ServicesDep) -> list[UserOut]:
    return [_user(u) for u in await asyncio.to_thread(services.registry.list_users)]


@router.get("/users/{name}")
async def get_user(name: str, services: ServicesDep) -> UserOut:
    return _user(await asyncio.to_thread(services.registry.get_user, name))


@router.patch("/users/{name}")
async def update_user(name: str, body: UserUpdate, services: ServicesDep) -> UserOut:
    user = await asyncio.to_thread(services.registry.set_proxy_alpha, name, body.proxy_alpha)
    return _user(user)


@router.delete("/users/{name}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_user(name: str, services: ServicesDep) -> None:
    await asyncio.to_thread(services.registry.delete_user, name)
    if services.limiter is not None:
        services.limiter.forget(name)


@router.post("/users/{name}/keys", status_code=status.HTTP_201_CREATED)
async def issue_key(name: str, services: ServicesDep) -> IssuedKeyOut:
    return _issued(await asyncio.to_thread(services.registry.issue_key, name))


@router.get("/users/{name}/keys")
async def list_keys(name: str, services: ServicesDep) -> list[KeyOut]:
    await asyncio.to_thread(services.registry.get_user, name)  # 404 for an unknown user
    return [_key(k) for k in await asyncio.to_thread(services.registry.list_keys, name)]


@router.delete("/keys/{key_id}")
async def revoke_key(key_id: str, services: ServicesDep) -> KeyOut:
    return _key(await asyncio.to_thread(services.registry.revoke_key, key_id))
