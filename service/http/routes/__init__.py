"""Thin HTTP routers, one per resource; the logic they call lives in `service.*` modules."""
