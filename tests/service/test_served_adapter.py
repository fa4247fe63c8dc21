"""What a user is served is visible: the `x-fedpersona-adapter` header names the adapter version
the engine applied (`<slot>@<version id>`) or `base`, on whole and streamed answers, and chat
metrics count by what answered (`personal`, `global`, `base`), not by the model name asked for."""

from __future__ import annotations

import pytest
from fake_engine import BASE_MODEL
from fedpersona.adapters import Slot
from gateway_harness import Gateway, GatewayFactory, tiny_lora

HEADER = "x-fedpersona-adapter"


def chats(gw: Gateway, kind: str, stream: str = "false") -> float:
    line = f'fedpersona_chat_seconds_count{{kind="{kind}",stream="{stream}"}} '
    for row in gw.metrics().splitlines():
        if row.startswith(line):
            return float(row[len(line) :])
    return 0.0


@pytest.mark.parametrize("stream", [False, True])
def test_own_adapter_is_named_in_the_header_and_counted_personal(gw: Gateway, stream: bool) -> None:
    response = gw.chat("alice", stream=stream)
    assert response.status_code == 200, response.text
    assert response.headers[HEADER] == f"users/alice/served@{gw.served['alice'].id}"
    assert chats(gw, "personal", str(stream).lower()) == 1
    assert chats(gw, "base", str(stream).lower()) == 0


@pytest.mark.parametrize("stream", [False, True])
def test_base_model_answers_say_base_and_are_not_counted_personal(
    gw: Gateway, stream: bool
) -> None:
    label = str(stream).lower()
    # carol has no adapter and the store holds no global one: the base model answers the alias.
    response = gw.chat("carol", stream=stream)
    assert response.status_code == 200, response.text
    assert response.headers[HEADER] == "base"
    assert gw.engine.last["model"] == BASE_MODEL
    # alice asks for the base model by name.
    assert gw.chat("alice", model=BASE_MODEL, stream=stream).headers[HEADER] == "base"
    assert chats(gw, "base", label) == 2
    assert chats(gw, "personal", label) == 0


def test_cold_start_names_the_global_adapter(make_gateway: GatewayFactory) -> None:
    gw = make_gateway()
    glob = gw.store.publish_lora(Slot.global_adapter("pftt"), tiny_lora(5))
    response = gw.chat("carol")
    assert response.status_code == 200, response.text
    assert response.headers[HEADER] == f"global/adapters/pftt@{glob.id}"
    assert chats(gw, "global") == 1 and chats(gw, "personal") == 0
    # Once carol has her own adapter, she is served it and the header says so.
    mine = gw.store.publish_lora(Slot.user_served("carol"), tiny_lora(6))
    assert gw.chat("carol").headers[HEADER] == f"users/carol/served@{mine.id}"
    assert chats(gw, "personal") == 1


def test_own_version_is_told_without_a_thread(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """Naming the user's own current version takes one cached `stat`, so it is read on the
    loop; only a version that is not (a global one at cold start) is looked up in a thread."""
    import asyncio

    handed: list[str] = []
    to_thread = asyncio.to_thread

    async def spy(func, /, *args, **kwargs):  # type: ignore[no-untyped-def]
        handed.append(getattr(func, "__qualname__", repr(func)))
        return await to_thread(func, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", spy)
    for stream in (False, True):
        response = gw.chat("alice", stream=stream)
        assert response.headers[HEADER] == f"users/alice/served@{gw.served['alice'].id}"
    assert "ServedLookup.find" not in handed
    glob = gw.store.publish_lora(Slot.global_adapter("pftt"), tiny_lora(5))
    assert gw.chat("carol").headers[HEADER] == f"global/adapters/pftt@{glob.id}"
    assert "ServedLookup.find" in handed
