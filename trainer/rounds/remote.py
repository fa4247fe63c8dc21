"""The round-controller interface over HTTP: a client of a trainer pod's `/admin/rounds`.

`RemoteRounds` implements `fedpersona.trainer.rounds.interface.RoundController` for gateways
that do not train themselves (the Helm chart's gateway pods): every call is one request to the
trainer pod, authenticated with the admin key, and every error answer is mapped back from the
OpenAI error envelope (`{"error": {"message", "type", "param", "code"}}`) to the same domain
error the in-process controller raises: 409 `RoundBusy`, 404 `RunNotFound`, 400
`InvalidRoundSpec` (with the envelope's `param`). A trainer that cannot be reached, answers 5xx,
or refuses the admin key (401/403: a deployment mistake, not the caller's) is
`RoundsUnreachable`.

Synchronous on purpose (httpx.Client): the routes call controllers in a worker thread, as they
do the in-process one. This module knows the wire format, nothing about training.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
from fedpersona.trainer.errors import InvalidRoundSpec, RoundBusy, RoundsUnreachable, RunNotFound
from fedpersona.trainer.rounds.records import RoundSpec, RunStatus, check_run_id
from pydantic import TypeAdapter, ValidationError

log = logging.getLogger(__name__)

_RUNS = TypeAdapter(list[RunStatus])


class RemoteRounds:
    """`RoundController` over HTTP; `url` is the `/admin/rounds` collection URL."""

    def __init__(
        self,
        url: str,
        *,
        admin_key: str,
        timeout_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self._client = httpx.Client(
            headers={"Authorization": f"Bearer {admin_key}"},
            timeout=timeout_s,
            transport=transport,
        )

    def start(self, spec: RoundSpec) -> str:
        body = spec.model_dump(mode="json")
        answer = self._request("POST", self.url, json=body)
        return self._parse(RunStatus, answer).id

    def get(self, run_id: str) -> RunStatus:
        # Checked here, not only by the trainer: the id becomes part of a URL.
        answer = self._request("GET", f"{self.url}/{check_run_id(run_id)}")
        return self._parse(RunStatus, answer)

    def list(self) -> list[RunStatus]:
        answer = self._request("GET", self.url)
        try:
            return _RUNS.validate_json(answer.content)
        except ValidationError as e:
            raise RoundsUnreachable(f"the trainer at {self.url} answered an unreadable list") from e

    def close(self) -> None:
        self._client.close()

    # ------------------------------------------------------------------------------ wire

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            answer = self._client.request(method, url, **kwargs)
        except httpx.HTTPError as e:
            raise RoundsUnreachable(f"cannot reach the trainer at {self.url}: {e}") from e
        if answer.is_success:
            return answer
        message, param = _error_fields(answer)
        status = answer.status_code
        if status == 409:
            raise RoundBusy(message)
        if status == 404:
            raise RunNotFound(message)
        if status in (400, 422):
            raise InvalidRoundSpec(message, param=param)
        if status in (401, 403):
            log.error("the trainer at %s refused the admin key: %s", self.url, message)
            raise RoundsUnreachable(
                "the trainer refused this gateway's admin key (FEDPERSONA_ADMIN_KEY differs)"
            )
        raise RoundsUnreachable(f"the trainer at {self.url} answered {status}: {message}")

    def _parse(self, model: type[RunStatus], answer: httpx.Response) -> RunStatus:
        try:
            return model.model_validate_json(answer.content)
        except ValidationError as e:
            raise RoundsUnreachable(f"the trainer at {self.url} answered an unreadable run") from e


def _error_fields(answer: httpx.Response) -> tuple[str, str | None]:
    """(message, param) from an OpenAI error envelope; the status line if there is none."""
    try:
        error = answer.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        param = error.get("param")
        return error["message"], param if isinstance(param, str) else None
    return f"HTTP {answer.status_code} {answer.reason_phrase}", None
