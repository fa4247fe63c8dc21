"""Chat serving through the whole app on the fake engine: routing, body sanitizing, streaming."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fake_engine import BASE_MODEL, FakeEngine
from fedpersona.adapters import AdapterStore, Slot
from fedpersona.service.errors import EngineRequestError
from fedpersona.service.http.chat import ChatConfig, ChatService
from fedpersona.service.http.protocol import ChatCompletionRequest
from fedpersona.service.metrics import Metrics
from fedpersona.service.registry import User
from gateway_harness import Gateway, GatewayFactory, engine_name, tiny_lora


def sse_events(text: str) -> list[str]:
    """The data payloads of an SSE body, in order; asserts the framing is clean."""
    blocks = [b for b in text.split("\n\n") if b]
    payloads = []
    for block in blocks:
        assert block.startswith("data: "), block
        payloads.append(block[len("data: ") :])
    return payloads


def test_personal_alias_forwards_users_current_adapter_and_rewrites_name(gw: Gateway) -> None:
    response = gw.chat("alice", temperature=0.0, max_tokens=5)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "personal"
    assert body["choices"][0]["message"]["content"] == gw.engine.reply
    sent = gw.engine.last
    assert sent["model"] == engine_name(gw.served["alice"])
    assert sent["temperature"] == 0.0 and sent["max_tokens"] == 5
    assert gw.engine.loaded == {engine_name(gw.served["alice"]): str(gw.served["alice"].path)}


def test_base_model_name_is_served_as_is(gw: Gateway) -> None:
    response = gw.chat("alice", model=BASE_MODEL)
    assert response.status_code == 200
    assert response.json()["model"] == BASE_MODEL
    assert gw.engine.last["model"] == BASE_MODEL
    assert gw.engine.load_calls == []


def test_user_without_adapter_gets_base_model_under_alias(gw: Gateway) -> None:
    response = gw.chat("carol")
    assert response.status_code == 200
    assert response.json()["model"] == "personal"
    assert gw.engine.last["model"] == BASE_MODEL


def test_new_published_version_is_served_on_next_request(gw: Gateway) -> None:
    assert gw.chat("alice").status_code == 200
    old = engine_name(gw.served["alice"])
    newer = gw.store.publish_lora(Slot.user_served("alice"), tiny_lora(seed=99))
    assert gw.chat("alice").status_code == 200
    assert gw.engine.last["model"] == engine_name(newer) != old


def test_engine_internal_and_unknown_fields_are_dropped(gw: Gateway) -> None:
    bob_path = str(gw.served["bob"].path)
    response = gw.chat(
        "alice",
        vllm_xargs={"fedpersona_expert": "users/bob/expert@0123456789abcdef"},
        lora_request={"lora_name": "bob", "lora_path": bob_path},
        lora_path=bob_path,
        guided_json={"type": "object"},
        chat_template="{{ 'pwned' }}",
        user="bob",
        priority=-100,
        some_future_field=1,
        seed=7,
        stop=["\n"],
    )
    assert response.status_code == 200, response.text
    sent = gw.engine.last
    expected = {"model", "messages", "seed", "stop", "stream"}
    assert set(sent) == expected, sent
    assert sent["seed"] == 7 and sent["stop"] == ["\n"]
    assert bob_path not in json.dumps(sent)


def test_message_parts_are_flattened_and_extra_message_fields_dropped(gw: Gateway) -> None:
    messages = [
        {"role": "system", "content": "be brief", "tool_calls": [{"id": "x"}]},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]
    response = gw.client.post(
        "/v1/chat/completions",
        json={"model": "personal", "messages": messages},
        headers=gw.auth("alice"),
    )
    assert response.status_code == 200, response.text
    assert gw.engine.last["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "ab"},
    ]


def _stream(gw: Gateway, user: str = "alice", **body: Any) -> list[str]:
    response = gw.chat(user, stream=True, **body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return sse_events(response.text)


def test_stream_rewrites_model_in_every_chunk_and_ends_with_done(gw: Gateway) -> None:
    events = _stream(gw)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) >= 3
    assert all(c["model"] == "personal" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == gw.engine.reply
    # The gateway asked the engine for usage on its own behalf; the client did not get it.
    assert gw.engine.last["stream_options"] == {"include_usage": True}
    assert all("usage" not in c for c in chunks)
    assert engine_name(gw.served["alice"]) not in "".join(events)


def test_stream_include_usage_is_honoured(gw: Gateway) -> None:
    events = _stream(gw, stream_options={"include_usage": True})
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    assert all(c["model"] == "personal" for c in chunks)


def test_stream_failing_midway_sends_error_event_then_done(gw: Gateway) -> None:
    gw.engine.fail_stream_after = 2
    events = _stream(gw)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])
    assert set(error) == {"error"}
    assert set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["type"] == "service_unavailable"
    assert len(events) == 4  # two chunks, the error, [DONE]
    assert "fedpersona_stream_errors_total 1.0" in gw.metrics()


def test_engine_down_is_503_with_retry_after(gw: Gateway) -> None:
    gw.engine.down = True
    for stream in (False, True):
        response = gw.chat("alice", stream=stream)
        assert response.status_code == 503
        assert int(response.headers["retry-after"]) >= 1
        assert response.json()["error"]["code"] == "engine_unavailable"
    response = gw.chat("carol", model=BASE_MODEL, stream=True)  # no adapter load involved
    assert response.status_code == 503


def test_engine_context_length_error_maps_to_400(gw: Gateway) -> None:
    gw.engine.error = EngineRequestError(
        400,
        {
            "error": {
                "message": "This model's maximum context length is 256 tokens.",
                "type": "BadRequestError",
                "param": "input_tokens",
                "code": 400,
            }
        },
    )
    for stream in (False, True):
        response = gw.chat("alice", stream=stream)
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "context_length_exceeded"
        assert "maximum context length" in error["message"]


def test_engine_server_error_is_502_without_internals(gw: Gateway) -> None:
    gw.engine.error = EngineRequestError(500, {"error": {"message": "CUDA OOM in worker 3"}})
    response = gw.chat("alice")
    assert response.status_code == 502
    assert "CUDA" not in response.text


def test_obviously_too_long_prompt_refused_without_engine(gw: Gateway) -> None:
    huge = "x" * (256 * 64 + 1)  # more bytes than max_model_len tokens can cover
    response = gw.client.post(
        "/v1/chat/completions",
        json={"model": "personal", "messages": [{"role": "user", "content": huge}]},
        headers=gw.auth("alice"),
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"
    too_many = gw.chat("alice", max_tokens=256)
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "max_tokens"
    assert gw.engine.received == []


def test_proxy_tuning_sets_expert_xargs_only_when_enabled(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(proxy_tuning=True)
    expert = gw.store.publish_lora(Slot.global_expert(), tiny_lora(seed=5))
    gw.registry.set_proxy_alpha("alice", 0.5)
    assert gw.chat("alice", vllm_xargs={"fedpersona_alpha": 9}).status_code == 200
    assert gw.engine.last["vllm_xargs"] == {
        "fedpersona_expert": f"global/expert@{expert.id}",
        "fedpersona_alpha": 0.5,
    }
    own = gw.store.publish_lora(Slot.user_expert("bob"), tiny_lora(seed=6))
    assert gw.chat("bob").status_code == 200
    assert gw.engine.last["vllm_xargs"]["fedpersona_expert"] == f"users/bob/expert@{own.id}"
    assert gw.chat("bob", model=BASE_MODEL).status_code == 200
    assert "vllm_xargs" not in gw.engine.last  # the plain base model stays plain


def test_proxy_tuning_off_never_sends_xargs(gw: Gateway) -> None:
    gw.store.publish_lora(Slot.global_expert(), tiny_lora(seed=5))
    assert gw.chat("alice").status_code == 200
    assert "vllm_xargs" not in gw.engine.last


def test_adapter_stays_loaded_across_requests(gw: Gateway) -> None:
    for _ in range(3):
        assert gw.chat("alice").status_code == 200
    assert len(gw.engine.load_calls) == 1
    assert "fedpersona_adapter_loads_total 1.0" in gw.metrics()


def test_unreadable_expert_fails_the_request_loudly(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(proxy_tuning=True)
    gw.store.publish_lora(Slot.user_expert("alice"), tiny_lora(seed=5))
    manifest = gw.store.root / "slots" / "users" / "alice" / "expert" / "current.json"
    manifest.write_text("{not json")  # hand-edited store
    response = gw.chat("alice")
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "adapter_load_failed"
    assert str(gw.store.root) not in response.text
    assert gw.chat("bob").status_code == 200  # others are unaffected


class _RecordingPinner:
    """An adapter pinner that records how many pins are held."""

    def __init__(self) -> None:
        self.held = 0

    @asynccontextmanager
    async def _use(self, user_id: str) -> AsyncIterator[str | None]:
        self.held += 1
        try:
            yield None
        finally:
            self.held -= 1

    def use(self, user_id: str) -> Any:
        return self._use(user_id)


def test_abandoned_stream_releases_its_pin_and_the_engine_stream(tmp_path: Path) -> None:
    engine = FakeEngine(chunk_delay_s=0.01)
    pinner = _RecordingPinner()
    service = ChatService(
        config=ChatConfig(
            personal_alias="personal",
            base_model=BASE_MODEL,
            max_model_len=256,
            max_bytes_per_token=64,
            proxy_tuning=False,
        ),
        engine=engine,
        adapters=pinner,
        store=AdapterStore(tmp_path / "store"),
        metrics=Metrics(),
    )
    request = ChatCompletionRequest.model_validate(
        {"model": "personal", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    )
    user = User(name="alice", created_at=0.0, proxy_alpha=1.0)

    async def scenario() -> None:
        events = await service.complete(request, user=user)
        assert not isinstance(events, dict)
        assert pinner.held == 1
        first = await anext(aiter(events))
        assert first.startswith(b"data: ")
        await events.aclose()  # type: ignore[attr-defined]  # the client went away
        assert pinner.held == 0
        assert service.metrics.registry.get_sample_value("fedpersona_streams_in_flight") == 0

    asyncio.run(scenario())
    assert engine.streams_closed == 1
