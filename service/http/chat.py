"""Chat serving: from an authenticated, validated request to the engine and back.

Steps: resolve the requested model (`fedpersona.service.routing`), refuse prompts that
certainly do not fit, pin the caller's current adapter in the engine (`AdapterManager.use`,
held until the response or the whole stream is done), build the engine body from the
allow-listed request fields (plus the proxy-tuning `vllm_xargs` that only this module sets,
built by `fedpersona.adapters.refs`), forward, and write the public model name back into the
response and into every stream chunk.

What answered is reported with the result (`ChatOutcome.adapter`, sent by the route as the
`x-fedpersona-adapter` header): `<slot>@<version id>` of the adapter the engine applied (the
user's own `users/<user>/served`, or on cold start a `global/adapters/<method>`), or `base` when
the base model answered. Metrics count by the same split (`served_kind`): `personal`, `global`,
`base`; a personal-alias request the base model answered is never counted as `personal`.

Knows nothing about HTTP frameworks: it returns a dict or an async iterator of SSE bytes, and
raises `GatewayError`s. Routes turn those into responses.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, Protocol

from fedpersona.adapters import AdapterError, AdapterStore, Slot, Version
from fedpersona.adapters.refs import ExpertRef, proxy_xargs
from fedpersona.service.engine.client import Renamer, chunk_has_content, stream_batches
from fedpersona.service.engine.events import (
    aclose_quietly,
    event_has_content,
    parse_event,
    sse_payload,
)
from fedpersona.service.errors import (
    AdapterLoadFailed,
    BadRequest,
    EngineRequestError,
    GatewayError,
    ProxyExpertFailed,
    UpstreamError,
)
from fedpersona.service.http.protocol import ChatCompletionRequest
from fedpersona.service.http.served import BASE, Served, ServedLookup
from fedpersona.service.metrics import Metrics, ServedKind
from fedpersona.service.registry import User
from fedpersona.service.routing import (
    ModelKind,
    ModelRoute,
    check_engine_name,
    check_prompt_fits,
    resolve_model,
)

logger = logging.getLogger(__name__)

DONE_EVENT = b"data: [DONE]\n\n"
ADAPTER_HEADER = "x-fedpersona-adapter"


@dataclass(frozen=True)
class ChatOutcome:
    """A chat result (a completion dict, or an iterator of SSE events) and what answered it."""

    result: dict[str, Any] | AsyncIterator[bytes]
    served: Served


class ChatEngine(Protocol):
    """The part of `fedpersona.service.engine.client.EngineClient` chat serving needs."""

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]: ...

    def stream_chat(self, body: dict[str, Any]) -> AsyncIterator[bytes]: ...


class AdapterPinner(Protocol):
    """The part of `fedpersona.service.engine.adapters.AdapterManager` chat serving needs."""

    def use(self, user_id: str) -> Any: ...  # AbstractAsyncContextManager[str | None]


@dataclass(frozen=True)
class ChatConfig:
    personal_alias: str
    base_model: str
    max_model_len: int
    max_bytes_per_token: int
    proxy_tuning: bool
    max_messages: int = 512
    min_tokens_per_message: int = 1


def sse_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class ChatService:
    def __init__(
        self,
        *,
        config: ChatConfig,
        engine: ChatEngine,
        adapters: AdapterPinner,
        store: AdapterStore,
        metrics: Metrics,
    ) -> None:
        self.config = config
        self.engine = engine
        self.adapters = adapters
        self.store = store
        self.metrics = metrics
        self.served_lookup = ServedLookup(store)

    async def complete(
        self, request: ChatCompletionRequest, *, user: User
    ) -> dict[str, Any] | AsyncIterator[bytes]:
        """`serve(...).result`."""
        return (await self.serve(request, user=user)).result

    async def serve(self, request: ChatCompletionRequest, *, user: User) -> ChatOutcome:
        """A chat completion dict, or (for `stream=true`) an iterator of SSE events, with what
        answered it.

        Every error that happens before the first byte is raised, so the route can still answer
        with the right status; errors after that become an error event followed by `[DONE]`.
        """
        if len(request.messages) > self.config.max_messages:
            raise BadRequest(
                f"A request may carry at most {self.config.max_messages} messages; this one has "
                f"{len(request.messages)}.",
                param="messages",
            )
        route = resolve_model(
            request.model, alias=self.config.personal_alias, base_model=self.config.base_model
        )
        # The chat template adds tokens around every message, even an empty one: counted as
        # bytes, `min_tokens_per_message` tokens each is exact for the lower bound.
        template_bytes = (
            len(request.messages) * self.config.min_tokens_per_message
        ) * self.config.max_bytes_per_token
        check_prompt_fits(
            prompt_bytes=template_bytes + sum(len(m.text().encode()) for m in request.messages),
            max_output_tokens=request.output_limit,
            max_model_len=self.config.max_model_len,
            max_bytes_per_token=self.config.max_bytes_per_token,
        )
        started = time.perf_counter()
        body: dict[str, Any] | None = None
        served = BASE
        try:
            # Engine errors leave the `async with` unmapped, so the adapter pin sees them (a 404
            # tells the adapter manager that vLLM lost the adapter), then they are translated.
            async with AsyncExitStack() as stack:
                body, lookup = await self._engine_body(request, route=route, user=user, stack=stack)
                if request.stream:
                    first, batches = await self._open_stream(body, stack=stack)
                    served = BASE if lookup is None else await lookup
                    # The relay owns the adapter pin and the engine stream from here on.
                    relay = self._relay(
                        first,
                        batches,
                        route=route,
                        kind=served.kind,
                        engine_model=body["model"],
                        include_usage=request.include_usage,
                        stack=stack.pop_all(),
                        started=started,
                    )
                    return ChatOutcome(relay, served)
                answer = await self.engine.chat(body)
                served = BASE if lookup is None else await lookup
        except EngineRequestError as e:
            raise self._engine_error(e, body=body) from e
        self._count_usage(answer.get("usage"), served.kind)
        answer.pop("system_fingerprint", None)  # names the engine's version
        self.metrics.chat_seconds.labels(served.kind.value, "false").observe(
            time.perf_counter() - started
        )
        answer["model"] = route.public_name
        return ChatOutcome(answer, served)

    async def _engine_body(
        self,
        request: ChatCompletionRequest,
        *,
        route: ModelRoute,
        user: User,
        stack: AsyncExitStack,
    ) -> tuple[dict[str, Any], asyncio.Future[Served] | None]:
        """The engine body, and the look-up of what serves it (None: the base model)."""
        engine_model = self.config.base_model
        lookup: asyncio.Future[Served] | None = None
        if route.kind is ModelKind.PERSONAL:
            lora = await stack.enter_async_context(self.adapters.use(user.name))
            if lora is not None:
                engine_model = check_engine_name(user.name, lora)
                own = self.served_lookup.own(user.name, lora)
                if own is not None:
                    lookup = asyncio.get_running_loop().create_future()
                    lookup.set_result(own)
                else:
                    # A global adapter's version (cold start), or one superseded since: which
                    # slot it is may take a scan of the store, so it is read in a thread while
                    # the engine request goes out (only the response's header and the metrics
                    # need it, after the engine's first answer).
                    lookup = asyncio.ensure_future(
                        asyncio.to_thread(self.served_lookup.find, user.name, lora)
                    )
                    stack.callback(_forget, lookup)
        body = request.engine_body(model=engine_model)
        if route.kind is ModelKind.PERSONAL and self.config.proxy_tuning:
            expert = await asyncio.to_thread(self._current_expert, user.name)
            if expert is not None:
                body["vllm_xargs"] = proxy_xargs(
                    ExpertRef(expert.slot, expert.id), alpha=user.proxy_alpha
                )
        return body, lookup

    def _current_expert(self, user: str) -> Version | None:
        """The user's own proxy expert, else the federation's, else None."""
        try:
            return self.store.current(Slot.user_expert(user)) or self.store.current(
                Slot.global_expert()
            )
        except AdapterError as e:
            # Serving without the expert would silently drop part of the personalization.
            logger.error("store: cannot read the proxy expert for %s: %s", user, e)
            raise AdapterLoadFailed() from e

    async def _open_stream(
        self, body: dict[str, Any], *, stack: AsyncExitStack
    ) -> tuple[list[bytes], AsyncIterator[list[bytes]]]:
        batches = aiter(stream_batches(self.engine, body))
        stack.push_async_callback(aclose_quietly, batches)
        try:
            first = await anext(batches)
        except StopAsyncIteration as e:
            raise UpstreamError("The inference engine closed the stream without answering.") from e
        return first, batches

    async def _relay(
        self,
        first: list[bytes],
        batches: AsyncIterator[list[bytes]],
        *,
        route: ModelRoute,
        kind: ServedKind,
        engine_model: str,
        include_usage: bool,
        stack: AsyncExitStack,
        started: float,
    ) -> AsyncIterator[bytes]:
        """The client's SSE events: what the engine sent in one read goes out as one write,
        except that the first token goes out as soon as it is renamed (an engine under load
        sends many events per read: the rest of the read would delay the time to first
        token)."""
        label = kind.value
        self.metrics.streams_in_flight.inc()
        rename = Renamer(engine_model, route.public_name)
        first_token_seen = False
        done = False
        try:
            batch: list[bytes] | None = first
            while batch is not None and not done:
                out: list[bytes] = []
                for i, line in enumerate(batch):
                    # Content chunks (all but the last few) are renamed without a JSON round
                    # trip.
                    fast = rename(line)
                    if fast is not None:
                        out.append(fast)
                        if not first_token_seen and chunk_has_content(line):
                            first_token_seen = True
                            self._observe_ttft(label, started)
                            if i + 1 < len(batch):  # the first token goes out before the rest
                                yield b"".join(out)
                                out = []
                        continue
                    payload = sse_payload(line)
                    if payload == b"[DONE]":
                        done = True
                        break
                    event = parse_event(payload) if payload is not None else None
                    if event is None:
                        continue
                    if "error" in event:
                        self.metrics.stream_errors.inc()
                        out.append(sse_event({"error": _public_error(event["error"])}))
                        out.append(DONE_EVENT)
                        yield b"".join(out)
                        return
                    if event.get("usage"):
                        self._count_usage(event["usage"], kind)
                    rewritten = _rewrite_chunk(
                        event, public_name=route.public_name, include_usage=include_usage
                    )
                    if rewritten is not None:
                        out.append(sse_event(rewritten))
                    if not first_token_seen and event_has_content(event):
                        first_token_seen = True
                        self._observe_ttft(label, started)
                        if out and i + 1 < len(batch):
                            yield b"".join(out)
                            out = []
                if done:
                    out.append(DONE_EVENT)
                if out:
                    yield out[0] if len(out) == 1 else b"".join(out)
                if not done:
                    batch = await anext(batches, None)
            if not done:
                raise UpstreamError("The inference engine ended the stream early.")
        except GatewayError as e:
            self.metrics.stream_errors.inc()
            logger.warning("stream failed midway: %s", e)
            yield sse_event(e.envelope()) + DONE_EVENT
        except EngineRequestError as e:
            self.metrics.stream_errors.inc()
            yield sse_event(self._engine_error(e).envelope()) + DONE_EVENT
        finally:
            self.metrics.streams_in_flight.dec()
            self.metrics.chat_seconds.labels(label, "true").observe(time.perf_counter() - started)
            await stack.aclose()

    def _observe_ttft(self, label: str, started: float) -> None:
        self.metrics.ttft_seconds.labels(label).observe(time.perf_counter() - started)

    def _engine_error(
        self, error: EngineRequestError, *, body: dict[str, Any] | None = None
    ) -> GatewayError:
        mapped = error.to_gateway_error()
        if mapped.status < 500 and _names_our_expert(error, body):
            # The engine refused the expert this gateway chose: a broken file in the store.
            logger.error("engine refused the proxy expert: %s %s", error.status, error.message)
            mapped = ProxyExpertFailed()
        self.metrics.engine_errors.labels(type(mapped).__name__).inc()
        if mapped.status >= 500:
            logger.error("engine error %s: %s", error.status, error.message)
        return mapped

    def _count_usage(self, usage: Any, served: ServedKind) -> None:
        if not isinstance(usage, dict):
            return
        kind = served.value
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(prompt, int) and prompt >= 0:
            self.metrics.prompt_tokens.labels(kind).inc(prompt)
        if isinstance(completion, int) and completion >= 0:
            self.metrics.completion_tokens.labels(kind).inc(completion)


def _forget(task: asyncio.Future[Any]) -> None:
    """Let `task` finish on its own, its outcome read so that a failure is not reported as
    never retrieved (the request failed first; its error is the one that counts)."""
    task.add_done_callback(lambda t: t.cancelled() or t.exception())


def _names_our_expert(error: EngineRequestError, body: dict[str, Any] | None) -> bool:
    """Whether an engine error is about the proxy expert this gateway put in `body`: its message
    names the expert reference, which only this gateway (never the client) chose."""
    xargs = (body or {}).get("vllm_xargs")
    if not isinstance(xargs, dict):
        return False
    refs = [v for v in xargs.values() if isinstance(v, str) and v]
    return any(ref in error.message for ref in refs)


def _rewrite_chunk(
    event: dict[str, Any], *, public_name: str, include_usage: bool
) -> dict[str, Any] | None:
    """Put the public model name in; strip the usage the gateway asked for on its own behalf,
    and the engine's version (`system_fingerprint`)."""
    event.pop("system_fingerprint", None)
    if not include_usage:
        if not event.get("choices") and "usage" in event:
            return None  # the usage-only final chunk the client did not ask for
        event.pop("usage", None)
    event["model"] = public_name
    return event


def _public_error(error: Any) -> dict[str, Any]:
    """An engine's mid-stream error as a gateway envelope: its message, our type and code."""
    message = error.get("message") if isinstance(error, dict) else None
    public = UpstreamError(message if isinstance(message, str) and message else None)
    return dict(public.envelope()["error"])
