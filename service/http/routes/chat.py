"""`POST /v1/chat/completions`: OpenAI chat, whole or streamed (server-sent events)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse
from fedpersona.service.http.auth import LimitedUser
from fedpersona.service.http.protocol import ChatCompletionRequest
from fedpersona.service.http.routes.deps import ServicesDep
from starlette.responses import Response

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
