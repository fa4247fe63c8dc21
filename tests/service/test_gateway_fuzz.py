"""Property-based fuzzing of the whole HTTP API from its own OpenAPI schema (schemathesis).

The real app with the fake engine, called in-process through ASGI, once without credentials
and once with a user key. Properties: no 5xx, responses conform to the schema where the schema
describes them, and every 4xx carries the OpenAI error envelope.
"""

from __future__ import annotations

from typing import Any

import pytest
from gateway_harness import Gateway, GatewayFactory

schemathesis = pytest.importorskip("schemathesis")

ENVELOPE_KEYS = {"message", "type", "param", "code"}
CASES = 0


def _check(response: Any, case: Any) -> None:
    global CASES
    CASES += 1
    status = response.status_code
    assert status < 500, f"{case.method} {case.path} -> {status}: {response.text[:300]}"
    if status >= 400:
        body = response.json()
        assert set(body["error"]) == ENVELOPE_KEYS, body


@pytest.mark.slow
@pytest.mark.parametrize("who", [None, "alice"])
def test_no_request_breaks_the_gateway(make_gateway: GatewayFactory, who: str | None) -> None:
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import response_schema_conformance

    global CASES
    CASES = 0
    gw: Gateway = make_gateway()
    schema = schemathesis.openapi.from_asgi("/openapi.json", gw.client.app)
    headers = gw.auth(who) if who else {}

    for operation in schema.get_all_operations():
        op = operation.ok()

        @settings(
            max_examples=40,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        @given(case=op.as_strategy())
        def run(case: Any) -> None:
            case.headers = {**(case.headers or {}), **headers}
            checks = [response_schema_conformance, not_a_server_error]
            response = case.call_and_validate(checks=checks)
            _check(response, case)

        run()
    assert CASES > 0
    print(f"\nfuzzed {CASES} cases ({'user key' if who else 'no key'}): no 5xx")
