"""Domain errors of the gateway, each mapped once to an HTTP status and an OpenAI error type.

Every error a client can see is a `GatewayError`; the app turns it into the OpenAI envelope
`{"error": {"message", "type", "param", "code"}}` with `status`, plus `Retry-After` where the
error carries `retry_after`. This module knows nothing about FastAPI: the mapping is data on the
classes, read by one exception handler in `fedpersona.service.http.app`.

`EngineUnavailable` and `EngineRequestError` are raised by
`fedpersona.service.engine.client.EngineClient` (the vLLM
side) and translated here, so the gateway never branches on vLLM's message text.
"""

from __future__ import annotations

from typing import Any, ClassVar

# vLLM's `VLLMValidationError.parameter` values for a prompt that does not fit the context.
_CONTEXT_LENGTH_PARAMS = frozenset({"input_tokens", "input_text"})


class GatewayError(Exception):
    """Base of every client-visible error: subclasses fix `status`, `type` and `code`."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal_error"
    code: ClassVar[str | None] = None
    default_message: ClassVar[str] = "Internal error."

    def __init__(
        self,
        message: str | None = None,
        *,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.param = param
        self.retry_after = retry_after
        super().__init__(self.message)

    def envelope(self) -> dict[str, Any]:
        return error_envelope(self.message, type_=self.type, param=self.param, code=self.code)

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        # Retry-After takes whole seconds; never advertise 0 (clients would hammer).
        return {"Retry-After": str(max(1, int(self.retry_after + 0.999)))}


def error_envelope(
    message: str, *, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    default_message = "Invalid request."


class PromptTooLong(BadRequest):
    code = "context_length_exceeded"
    default_message = "The prompt does not fit the model's context length."


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"
    default_message = "The request body is too large."


class RequestTimeout(GatewayError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"
    default_message = "The request body did not arrive in time."


class ClientDisconnected(GatewayError):
    """The client left before the answer was ready; the engine request was cancelled. Nobody
    reads the response: the status (nginx's 499) is for logs and metrics."""

    status = 499
    type = "invalid_request_error"
    code = "client_closed_request"
    default_message = "The client closed the connection."


class AuthenticationFailed(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"
    default_message = "Incorrect API key provided."


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"
    code = "insufficient_permissions"
    default_message = "This endpoint needs the admin key."


class ModelNotFound(GatewayError):
    """The one answer for a model the caller may not use, whether or not it exists."""

    status = 404
    type = "invalid_request_error"
    code = "model_not_found"
    default_message = "The model does not exist or you do not have access to it."

    def __init__(self) -> None:
        # Deliberately takes no arguments: the body must not depend on what was asked for, so
        # "another user's adapter" and "no such model" are indistinguishable.
        super().__init__(param="model")


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"
    default_message = "Not found."


class Conflict(GatewayError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"
    default_message = "Conflict with the current state."


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"
    default_message = "Rate limit exceeded for this API key; retry later."


class TooManyInFlight(RateLimited):
    code = "too_many_concurrent_requests"
    default_message = "Too many requests of this user are running at once; wait for one to finish."


class UpstreamError(GatewayError):
    """The engine failed a request in a way that is not the client's fault."""

    status = 502
    type = "upstream_error"
    code = "engine_error"
    default_message = "The inference engine failed to answer the request."


class EngineUnavailable(GatewayError):
    """The engine cannot be reached (down, starting, or timed out). Raised by `EngineClient`."""

    status = 503
    type = "service_unavailable"
    code = "engine_unavailable"
    default_message = "The inference engine is not available; retry later."

    def __init__(self, message: str | None = None, *, retry_after: float | None = 5.0) -> None:
        super().__init__(message, retry_after=retry_after)


class AdapterLoadFailed(GatewayError):
    """The caller's current adapter could not be loaded into the engine (bad files, engine
    refused it). Raised by `fedpersona.service.engine.adapters.AdapterManager`; the cause is
    logged, not
    shown, since it names server-side paths."""

    status = 500
    type = "server_error"
    code = "adapter_load_failed"
    default_message = (
        "Your personalized model could not be loaded by the inference engine; "
        "the operator has to publish a working adapter."
    )


class ProxyExpertFailed(GatewayError):
    """The engine could not use the caller's proxy-tuning expert (a broken file in the store):
    the operator's problem, not the client's. The engine's message names store paths, so it is
    logged, never shown."""

    status = 500
    type = "server_error"
    code = "proxy_expert_failed"
    default_message = (
        "Your personalized model could not be applied by the inference engine; "
        "the operator has to publish a working expert."
    )


# Longest engine message shown to a client; longer ones are dumps, not explanations.
_MAX_ENGINE_MESSAGE = 300


def _client_message(message: str) -> str | None:
    """An engine's 4xx message when it is a short sentence; None for dumps (pydantic errors,
    reprs, multi-line text), which are logged by the caller and replaced by a generic line."""
    message = message.strip()
    if not message or len(message) > _MAX_ENGINE_MESSAGE or "\n" in message:
        return None
    if any(marker in message for marker in ("pydantic", "input_value", "{", "Traceback")):
        return None
    return message


class EngineRequestError(Exception):
    """The engine answered a request with an error status. Raised by `EngineClient`.

    Not a `GatewayError` itself: the gateway decides what the client sees (`to_gateway_error`),
    so engine internals such as versioned adapter names are never echoed blindly.
    """

    def __init__(self, status: int, envelope: dict[str, Any] | None = None) -> None:
        self.status = status
        self.envelope = envelope or {}
        super().__init__(f"engine answered {status}: {self._field('message')}")

    def _field(self, name: str) -> Any:
        err = self.envelope.get("error", self.envelope)
        return err.get(name) if isinstance(err, dict) else None

    @property
    def message(self) -> str:
        value = self._field("message")
        return value if isinstance(value, str) else ""

    @property
    def param(self) -> str | None:
        value = self._field("param")
        return value if isinstance(value, str) else None

    def to_gateway_error(self) -> GatewayError:
        if self.status == 400 and self.param in _CONTEXT_LENGTH_PARAMS:
            return PromptTooLong(_client_message(self.message), param="messages")
        if self.status in (400, 422):
            # Sampling-parameter validation by vLLM: the client's fault; its message is shown
            # only when it is a plain sentence.
            message = _client_message(self.message) or "The inference engine refused a parameter."
            return BadRequest(message, param=self.param)
        if self.status == 404:
            # The adapter vanished between load and use (eviction race): retryable, not a 404
            # the client could mistake for "no such model".
            return EngineUnavailable("The model is being reloaded; retry shortly.", retry_after=1)
        if self.status in (429, 503):
            return EngineUnavailable(retry_after=5)
        return UpstreamError()


class EngineStartFailed(RuntimeError):
    """The supervised vLLM server could not be started (or restarted). Raised by
    `fedpersona.service.engine.supervisor.EngineSupervisor.wait_ready` to the command that started
    the gateway;
    never shown to API clients (they see `EngineUnavailable`). The message ends with the last
    lines of vLLM's log."""


class StoreUnwritable(GatewayError):
    """A write the gateway makes to the adapter store (a user's preferences) failed: the volume
    is read-only, full or gone. Nothing was changed."""

    status = 503
    type = "service_unavailable"
    code = "store_unwritable"
    default_message = "The adapter store cannot be written; nothing was changed."


class RegistryUnavailable(GatewayError):
    """A request needed the user registry's database and it did not answer (down, restarting,
    out of connections). Raised by `fedpersona.service.db`; clients get a 503 with Retry-After,
    the cause is logged, never shown."""

    status = 503
    type = "service_unavailable"
    code = "registry_unavailable"
    default_message = "The user registry is not available; retry later."

    def __init__(self, message: str | None = None, *, retry_after: float | None = 5.0) -> None:
        super().__init__(message, retry_after=retry_after)
