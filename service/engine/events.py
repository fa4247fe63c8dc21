"""The engine's stream, one server-sent-event line at a time: read its data, tell a content
chunk or a server error apart, and close a stream however it ended.

Shared by chat serving (`fedpersona.service.http.chat`, which rewrites what it relays) and the
replica set (`fedpersona.service.engine.replica_set`, which fails over on an error that comes
before the first line). Pure functions over bytes and dicts, except `aclose_quietly`.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fedpersona.service.errors import EngineRequestError

logger = logging.getLogger(__name__)


def sse_payload(line: bytes) -> bytes | None:
    """The data of one SSE line, or None for comments, other fields and blank lines."""
    line = line.strip()
    if not line.startswith(b"data:"):
        return None
    return line[5:].strip()


def parse_event(payload: bytes) -> dict[str, Any] | None:
    """One event's JSON object; None (logged) for anything else."""
    try:
        event = json.loads(payload)
    except ValueError:
        logger.warning("dropping unreadable stream chunk from the engine")
        return None
    return event if isinstance(event, dict) else None


def event_has_content(event: dict[str, Any]) -> bool:
    """Whether a chunk carries generated text (the role-only first chunk does not)."""
    for choice in event.get("choices") or ():
        delta = choice.get("delta") or {}
        if delta.get("content"):
            return True
    return False


def server_error(line: bytes) -> EngineRequestError | None:
    """A stream line that is a server error event (vLLM reports a failure after its 200 status
    as `data: {"error": {..., "code": 500}}`), as the error; None for any other line."""
    if not line.startswith(b"data:") or b'"error"' not in line:
        return None
    try:
        event = json.loads(line[5:])
    except ValueError:
        return None
    error = event.get("error") if isinstance(event, dict) else None
    if not isinstance(error, dict):
        return None
    code = error.get("code")
    status = code if isinstance(code, int) else 500
    return EngineRequestError(status, event) if status >= 500 else None


async def aclose_quietly(lines: AsyncIterator[Any]) -> None:
    """Close a stream (its engine connection goes back or is dropped); a failure while closing
    is not the request's error."""
    aclose = getattr(lines, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()
