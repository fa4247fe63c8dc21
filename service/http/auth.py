"""Who is calling: Bearer API keys for users, one admin key for `/admin`, and rate limiting.

FastAPI dependencies, declared once as `Annotated` aliases (`CurrentUser`, `LimitedUser`,
`AdminAccess`) for the routers. Key checks are in `fedpersona.service.registry` (hashes, constant
time);
this module only reads the header and maps outcomes to `AuthenticationFailed` (401, no or bad
key) and `PermissionDenied` (403, a valid user key on an admin route).
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fedpersona.service.errors import AuthenticationFailed, PermissionDenied, RateLimited
from fedpersona.service.registry import User
from fedpersona.service.state import Services, get_services

_MISSING = (
    "Missing API key. Send it as 'Authorization: Bearer <key>'; an administrator creates keys "
    "with `fedpersona users add NAME`."
)


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


# Plain `def` dependencies: FastAPI runs them in its thread pool, so the SQLite look-up never
# blocks the event loop.
def current_user(request: Request, services: Annotated[Services, Depends(get_services)]) -> User:
    token = bearer_token(request)
    if token is None:
        raise AuthenticationFailed(_MISSING)
    user = services.registry.authenticate(token)
    if user is None:
        raise AuthenticationFailed()
    return user


CurrentUser = Annotated[User, Depends(current_user)]


def rate_limited_user(
    user: CurrentUser, services: Annotated[Services, Depends(get_services)]
) -> User:
    if services.limiter is not None:
        retry_after = services.limiter.acquire(user.name)
        if retry_after is not None:
            services.metrics.rate_limited.inc()
            raise RateLimited(retry_after=retry_after)
    return user


LimitedUser = Annotated[User, Depends(rate_limited_user)]


def require_admin(request: Request, services: Annotated[Services, Depends(get_services)]) -> None:
    admin_key = services.settings.admin_key.get_secret_value()
    token = bearer_token(request)
    if token is None:
        raise AuthenticationFailed(_MISSING)
    if admin_key and hmac.compare_digest(token.encode(), admin_key.encode()):
        return
    if services.registry.authenticate(token) is not None:
        raise PermissionDenied()
    if not admin_key:
        raise PermissionDenied("The admin API is disabled: set FEDPERSONA_ADMIN_KEY.")
    raise AuthenticationFailed()


AdminAccess = Depends(require_admin)
