"""`GET /v1/models`: only the models the caller may use (their alias and the base model)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fedpersona.service.errors import ModelNotFound
from fedpersona.service.http.auth import LimitedUser
from fedpersona.service.http.protocol import ModelCard, ModelList
from fedpersona.service.http.routes.deps import ServicesDep
from fedpersona.service.routing import visible_models

router = APIRouter(tags=["models"])


def _cards(services: ServicesDep) -> list[ModelCard]:
    names = visible_models(alias=services.settings.personal_alias, base_model=services.base_model)
    return [ModelCard(id=name, created=services.created) for name in names]


@router.get("/v1/models")
async def list_models(_: LimitedUser, services: ServicesDep) -> ModelList:
    return ModelList(data=_cards(services))


_DETAIL_PREFIX = "/v1/models/"


@router.get(_DETAIL_PREFIX + "{model:path}")
async def get_model(request: Request, _: LimitedUser, services: ServicesDep) -> ModelCard:
    model: str = request.path_params["model"]
    # The route pattern ends in `$`, which also matches before a trailing newline: the path
    # parameter of ".../personal\n" is "personal". Only an exact path names a model.
    if not request.scope["path"].endswith("/" + model):
        raise ModelNotFound()
    for card in _cards(services):
        if card.id == model:
            return card
    raise ModelNotFound()
