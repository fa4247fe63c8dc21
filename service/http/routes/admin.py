"""`/admin/users` and `/admin/keys`: create and delete users, issue and revoke API keys, set a
user's proxy alpha and PFIT reward mix.

Every route needs the admin key (`fedpersona.service.http.auth.AdminAccess`). The raw API key
appears only in the response that issues it; the registry keeps its hash. Creating and deleting
users goes through `fedpersona.service.accounts`, as `fedpersona users` does: deleting answers
what was quarantined, and a deleted user's name is refused (409 `user_name_deleted`) unless
`?reuse_deleted_name=true` is given. A user's reward mix is kept in the adapter store beside
their slots, where the trainer reads it (`fedpersona.service.preferences`); every user shown
carries the mix they train with.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, status
from fedpersona.service import accounts, preferences
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
from pydantic import BaseModel, Field

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminAccess])


def _user(user: User, store_root: Path, *, reward_mix: float | None = None) -> UserOut:
    """The wire form of `user`; reads their reward mix from the store unless given (call it in
    a thread)."""
    return UserOut(
        name=user.name,
        created_at=user.created_at,
        proxy_alpha=user.proxy_alpha,
        reward_mix=preferences.reward_mix_of(store_root, user.name)
        if reward_mix is None
        else reward_mix,
        active_keys=user.active_keys,
    )


def _key(key: KeyInfo) -> KeyOut:
    return KeyOut(
        key_id=key.key_id, user=key.user, created_at=key.created_at, revoked_at=key.revoked_at
    )


def _issued(key: IssuedKey) -> IssuedKeyOut:
    return IssuedKeyOut(key_id=key.key_id, user=key.user, api_key=key.api_key)


class UserDeleted(BaseModel):
    name: str
    user_id: str = Field(description="the deleted user's immutable id")
    deleted_at: float
    quarantined: list[str] = Field(description="slots moved out of serving")
    quarantined_to: str | None = Field(description="where below the store root, if anywhere")
    message: str = Field(description="what happened, in one sentence")


ReuseDeletedName = Annotated[
    bool,
    Query(
        description="give a deleted user's name to a new user, from a clean slate (their "
        "store slots are quarantined again; refused while their silo exists)"
    ),
]


@router.post("/users", status_code=status.HTTP_201_CREATED)
async def create_user(
    body: UserCreate, services: ServicesDep, reuse_deleted_name: ReuseDeletedName = False
) -> UserCreated:
    registry = services.registry
    check_user_name(body.name)
    await asyncio.to_thread(
        accounts.create_user,
        registry,
        name=body.name,
        proxy_alpha=body.proxy_alpha,
        reuse_deleted_name=reuse_deleted_name,
        store_root=services.store.root,
        silos=services.settings.layout.silos,
    )
    issued = await asyncio.to_thread(registry.issue_key, body.name) if body.issue_key else None
    user = await asyncio.to_thread(registry.get_user, body.name)
    out = await asyncio.to_thread(_user, user, services.store.root)
    return UserCreated(user=out, key=_issued(issued) if issued else None)


@router.get("/users")
async def list_users(services: ServicesDep) -> list[UserOut]:
    users = await asyncio.to_thread(services.registry.list_users)
    return await asyncio.to_thread(lambda: [_user(u, services.store.root) for u in users])


@router.get("/users/{name}")
async def get_user(name: str, services: ServicesDep) -> UserOut:
    user = await asyncio.to_thread(services.registry.get_user, name)
    return await asyncio.to_thread(_user, user, services.store.root)


@router.patch("/users/{name}")
async def update_user(name: str, body: UserUpdate, services: ServicesDep) -> UserOut:
    """Set the fields given (validated before anything is written); the others stay."""
    registry, root = services.registry, services.store.root
    user = await asyncio.to_thread(registry.get_user, name)  # 404 before any write
    written = None
    if body.reward_mix is not None:
        # Ordered against a concurrent DELETE of the user (see `preferences.set_reward_mix`).
        written = await asyncio.to_thread(
            preferences.set_reward_mix,
            registry,
            name=name,
            reward_mix=body.reward_mix,
            store_root=root,
        )
    if body.proxy_alpha is not None:
        user = await asyncio.to_thread(registry.set_proxy_alpha, name, body.proxy_alpha)
    # The mix just written, not re-read: a DELETE right after may have moved the file already.
    mix = None if written is None else written.reward_mix
    return await asyncio.to_thread(_user, user, root, reward_mix=mix)


@router.delete("/users/{name}")
async def delete_user(name: str, services: ServicesDep) -> UserDeleted:
    deletion = await asyncio.to_thread(
        accounts.delete_user,
        services.registry,
        name=name,
        store_root=services.store.root,
        silos=services.settings.layout.silos,
    )
    if services.limiter is not None:
        services.limiter.forget(name)
    return UserDeleted(
        name=name,
        user_id=deletion.tombstone.user_id,
        deleted_at=deletion.tombstone.deleted_at,
        quarantined=list(deletion.quarantined),
        quarantined_to=None
        if deletion.quarantine is None
        else deletion.quarantine.relative_to(services.store.root).as_posix(),
        message=deletion.message,
    )


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
