"""The official openai SDK against the gateway (fake engine): wire compatibility and errors."""

from __future__ import annotations

import openai
import pytest
from fake_engine import BASE_MODEL
from gateway_harness import Gateway, GatewayFactory


def _client(gw: Gateway, user: str | None = "alice", *, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(
        base_url="http://testserver/v1",
        api_key=key or gw.keys[user or "alice"],
        http_client=gw.client,  # Starlette's TestClient is an httpx.Client over the ASGI app
        max_retries=0,
    )


def test_sdk_chat_stream_and_models(gw: Gateway) -> None:
    client = _client(gw)
    completion = client.chat.completions.create(
        model="personal",
        messages=[{"role": "user", "content": "hello"}],
        temperature=0,
        max_completion_tokens=8,
        seed=1,
        extra_body={"vllm_xargs": {"x": 1}},
    )
    assert completion.model == "personal"
    assert completion.choices[0].message.content == gw.engine.reply
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    assert "vllm_xargs" not in gw.engine.last

    stream = client.chat.completions.create(
        model="personal",
        messages=[{"role": "user", "content": "hello"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert {c.model for c in chunks} == {"personal"}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == gw.engine.reply
    assert chunks[-1].usage is not None

    assert [m.id for m in client.models.list()] == ["personal", BASE_MODEL]
    assert client.models.retrieve("personal").id == "personal"


def test_sdk_raises_the_right_exceptions(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(rate_limit_rpm=1, rate_limit_burst=2)
    client = _client(gw)
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="u-bob", messages=[{"role": "user", "content": "x"}])
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="personal", messages=[])
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(
            model="personal", messages=[{"role": "user", "content": "x"}]
        )
    with pytest.raises(openai.AuthenticationError):
        _client(gw, key="fp-nope").models.list()


def test_sdk_sees_a_midway_stream_failure(gw: Gateway) -> None:
    gw.engine.fail_stream_after = 2
    stream = _client(gw).chat.completions.create(
        model="personal", messages=[{"role": "user", "content": "x"}], stream=True
    )
    with pytest.raises(openai.APIError, match=r"mid-stream|not available"):
        list(stream)
