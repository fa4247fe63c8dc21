"""The integration suite's real-process fixtures, loaded by file path under their own module name
(a conftest is not importable by name: every test folder's is called `conftest`). Imported by
module name by the tests, which take the fixtures, the types and the admin key from here.

One vLLM per session when `tests/security` runs on its own; a session that also collects
`tests/integration` holds one server per definition (pytest keeps one cache per fixture
definition), so the full suite pays one extra start-up (about a minute on the micro model)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_SOURCE = Path(__file__).resolve().parent.parent / "integration" / "conftest.py"
_NAME = "fedpersona_integration_fixtures"


def _load() -> object:
    if _NAME in sys.modules:
        return sys.modules[_NAME]
    spec = importlib.util.spec_from_file_location(_NAME, _SOURCE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[_NAME] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


_fixtures = _load()
vllm_server = _fixtures.vllm_server  # type: ignore[attr-defined]
gateway = _fixtures.gateway  # type: ignore[attr-defined]
GatewayUnderTest = _fixtures.GatewayUnderTest  # type: ignore[attr-defined]
ADMIN_KEY: str = _fixtures.ADMIN_KEY  # type: ignore[attr-defined]
