"""Who is calling: Bearer API keys for users, one admin key for `/admin`, and rate limiting.

FastAPI dependencies, declared once as `Annotated` aliases (`CurrentUser`, `LimitedUser`,
`AdminAccess`) for the routers. User key checks are in `fedpersona.service.registry` (hashes,
constant time); this module only reads the header and maps outcomes to `AuthenticationFailed`
(401, no or bad key) and `PermissionDenied` (403, a valid user key on an admin route, or no
admin key configured).

The admin rules live in `AdminGuard`, kept on `app.state.admin_guard`, so that every app serving
an admin route applies the same ones: the gateway (whose guard also recognises user keys) and
the trainer pod's API (`fedpersona.trainer_api`, which has no users).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fedpersona.service.errors import AuthenticationFailed, PermissionDenied, RateLimited
from fedpersona.service.http.middleware import MISSING_KEY as _MISSING
from fedpersona.service.http.middleware import USER_STATE
from fedpersona.service.registry import User
from fedpersona.service.state import Services, get_services
from starlette.concurrency import run_in_threadpool


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


# `async` dependencies that hand off to the thread pool only for what may block: a thread
# hand-off per request was, measured, a fifth of the gateway's busy time on the relay benchmark,
# and `AuthenticateFirst` has almost always looked the key up already.
async def current_user(
    request: Request, services: Annotated[Services, Depends(get_services)]
) -> User:
    return await user_of(request, services)


async def user_of(request: Request, services: Services) -> User:
    """The caller: the user `AuthenticateFirst` found for this request before its body was
    read, else (an app built without it) the key looked up again, in a worker thread."""
    checked = request.scope.get("state", {}).get(USER_STATE)
    if isinstance(checked, User):
        return checked
    return await run_in_threadpool(_authenticate, request, services)


def _authenticate(request: Request, services: Services) -> User:
    """The SQLite look-up, in a worker thread so it never blocks the event loop."""
    token = bearer_token(request)
    if token is None:
        raise AuthenticationFailed(_MISSING)
    user = services.registry.authenticate(token)
    if user is None:
        raise AuthenticationFailed()
    return user


CurrentUser = Annotated[User, Depends(current_user)]


async def rate_limited_user(
    user: CurrentUser, services: Annotated[Services, Depends(get_services)]
) -> User:
    await charge_request(user, services)
    return user


async def charge_request(user: User, services: Services) -> None:
    """Count one request against `user`'s rate limit; raises `RateLimited` (429) over it."""
    limiter = services.limiter
    if limiter is not None:
        if limiter.blocking:  # a database-backed limiter: a round trip
            retry_after = await run_in_threadpool(limiter.acquire, user.name)
        else:  # in memory: a lock and a few additions
            retry_after = limiter.acquire(user.name)
        if retry_after is not None:
            services.metrics.rate_limited.inc()
            raise RateLimited(retry_after=retry_after)


LimitedUser = Annotated[User, Depends(rate_limited_user)]


MISSING_ADMIN_KEY = (
    "Missing admin key. Send it as 'Authorization: Bearer <admin key>'; the operator sets the "
    "admin key with FEDPERSONA_ADMIN_KEY when starting the server."
)


def _no_users(_: str) -> bool:
    return False


@dataclass(frozen=True)
class AdminGuard:
    """The admin key rules. `key=""` disables the admin API (403, never open);
    `is_user_key` tells a valid user key (403: authenticated, not allowed) from a wrong one."""

    key: str
    is_user_key: Callable[[str], bool] = _no_users

    def check(self, token: str | None) -> None:
        if token is None:
            raise AuthenticationFailed(MISSING_ADMIN_KEY)
        if self.key and hmac.compare_digest(token.encode(), self.key.encode()):
            return
        if self.is_user_key(token):
            raise PermissionDenied()
        if not self.key:
            raise PermissionDenied("The admin API is disabled: set FEDPERSONA_ADMIN_KEY.")
        raise AuthenticationFailed()


def gateway_admin_guard(services: Services) -> AdminGuard:
    """The gateway's guard: its admin key, and its registry for user keys."""
    registry = services.registry
    return AdminGuard(
        key=services.settings.admin_key.get_secret_value(),
        is_user_key=lambda token: registry.authenticate(token) is not None,
    )


# A plain `def`: the user-key look-up (SQLite) runs in FastAPI's thread pool.
def require_admin(request: Request) -> None:
    guard: AdminGuard = request.app.state.admin_guard
    guard.check(bearer_token(request))


AdminAccess = Depends(require_admin)
