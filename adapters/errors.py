"""Domain errors of the adapter store.

Every error the `adapters` package raises on purpose derives from `AdapterError`, so callers
(the gateway maps them to HTTP statuses once) can catch the family without catching bugs.
This module knows nothing about HTTP; the mapping lives with the service.
"""

from __future__ import annotations


class AdapterError(Exception):
    """Base class of the adapter store's errors."""


class InvalidAdapter(AdapterError):
    """An adapter (files or in-memory tensors) that vLLM would reject or mis-serve.

    The message names the file and the field that is wrong.
    """


class NotFound(AdapterError):
    """A slot or a version that does not exist in the store."""


class InvalidName(AdapterError, ValueError):
    """A user id, adapter name or slot path that is not allowed.

    Also a `ValueError`, so code that validates input generically still catches it.
    """


class StoreCorrupt(AdapterError):
    """The store on disk contradicts itself (for example a manifest pointing at nothing).

    Publishing never produces this state; it means someone edited the store by hand.
    """
