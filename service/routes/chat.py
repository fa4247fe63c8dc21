"""`POST /v1/chat/completions`: OpenAI chat, whole or streamed (server-sent events)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.responses import Response

from service.auth import LimitedUser
from service.protocol import ChatCompletionRequest
from service.routes.deps import ServicesDep

router = APIRouter(tags=["chat"])


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(
    body: ChatCompletionRequest, user: LimitedUser, services: ServicesDep
) -> Response:
    result = await services.chat.complete(body, user=user)
    if isinstance(result, dict):
        return JSONResponse(result)
    return StreamingResponse(
        result,
        media_type="text/event-stream",
        # Proxies must pass events through as they come.
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
