"""A re-created user name is never answered by the deleted user's adapter, on a real vLLM.

Issue 13, defect 2, end to end: greta is answered by her own (strong) adapter; after the admin
API deletes her and the operator reuses the name, the new greta gets the base model's answer,
byte for byte, not the old adapter's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest

if TYPE_CHECKING:  # only for annotations: several conftest.py files share the module name
    from conftest import GatewayUnderTest

pytestmark = pytest.mark.vllm

ADMIN = {"Authorization": "Bearer integration-admin-key-0123456789"}
PROMPT = [{"role": "user", "content": "Tell me about the sea."}]
GREEDY: dict[str, Any] = {"temperature": 0.0, "max_tokens": 16, "seed": 0}


def _ask(gw: GatewayUnderTest, key: str) -> str:
    client = openai.OpenAI(base_url=gw.url, api_key=key, max_retries=0, timeout=120)
    answer = client.chat.completions.create(model="personal", messages=PROMPT, **GREEDY)  # type: ignore[arg-type]
    return answer.choices[0].message.content or ""


def test_reused_name_gets_the_base_model_not_the_old_adapter(gateway: GatewayUnderTest) -> None:
    gw = gateway
    with httpx.Client(base_url=gw.root, headers=ADMIN, timeout=60) as admin:
        created = admin.post("/admin/users", json={"name": "greta"})
        assert created.status_code == 201
        gw.publish("greta", seed=77)
        old_answer = _ask(gw, created.json()["key"]["api_key"])
        base = gw.vllm.direct({"model": gw.vllm.model, "messages": PROMPT, **GREEDY})
        base_answer = str(base["choices"][0]["message"]["content"])
        assert old_answer != base_answer  # the adapter really changes the answer

        deleted = admin.delete("/admin/users/greta")
        assert deleted.status_code == 200 and deleted.json()["quarantined"]
        assert admin.post("/admin/users", json={"name": "greta"}).status_code == 409
        reused = admin.post("/admin/users?reuse_deleted_name=true", json={"name": "greta"})
        assert reused.status_code == 201

    new_answer = _ask(gw, reused.json()["key"]["api_key"])
    assert new_answer == base_answer and new_answer != old_answer
