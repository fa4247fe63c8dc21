"""Real processes for the security matrix: the integration suite's session vLLM and its gateway.

`vllm_server` and `gateway` are the fixtures of `tests/integration/conftest.py`, loaded from
that file by `real_processes` under their own module name (a conftest is not importable by
name: every folder's is called `conftest`). The security tests attack exactly the engine and
gateway the integration tests use, built by the same code (`EngineSupervisor`,
`support.gateway`), with no second configuration to drift.

One vLLM per session when this folder runs on its own; a session that collects both
`tests/integration` and `tests/security` holds one server per folder (pytest keeps one fixture
definition per conftest), so the full suite pays one extra start-up (about a minute on the
micro model).
"""

from __future__ import annotations

from real_processes import gateway, vllm_server

__all__ = ["gateway", "vllm_server"]
