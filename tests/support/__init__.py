"""Test support shared by every test folder: one LoRA builder, servers in threads, a real gateway.

Importable as `support` from any test module (pytest puts `tests/` on `sys.path` for
`tests/conftest.py`). Modules here are plain helpers, never fixtures: each test folder keeps its
own conftest.py, and `from conftest import` would be ambiguous between them.
"""
