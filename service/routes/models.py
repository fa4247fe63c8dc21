"""`GET /v1/models`: only the models the caller may use (their alias and the base model)."""

from __future__ import annotations

from fastapi import APIRouter

from service.auth import LimitedUser
from service.errors import ModelNotFound
from service.protocol import ModelCard, ModelList
from service.routes.deps import ServicesDep
from service.routing import visible_models

router = APIRouter(tags=["models"])


def _cards(services: ServicesDep) -> list[ModelCard]:
    names = visible_models(alias=services.settings.personal_alias, base_model=services.base_model)
    return [ModelCard(id=name, created=services.created) for name in names]


@router.get("/v1/models")
async def list_models(_: LimitedUser, services: ServicesDep) -> ModelList:
    return ModelList(data=_cards(services))


@router.get("/v1/models/{model:path}")
async def get_model(model: str, _: LimitedUser, services: ServicesDep) -> ModelCard:
    for card in _cards(services):
        if card.id == model:
            return card
    raise ModelNotFound()
