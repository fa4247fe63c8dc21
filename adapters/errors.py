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


class ReadOnlyStore(AdapterError):
    """A write (publish) to a store opened with `read_only=True`."""


class InvalidManifest(AdapterError, ValueError):
    """A model directory whose `fedpersona.json` is missing or malformed (names file and field).

    Also a `ValueError`, so start-up code that reports bad configuration catches it.
    """


class RankLimitMismatch(AdapterError, ValueError):
    """The store would accept adapters the engine refuses: its rank limit is above the
    engine's `--max-lora-rank` (also a `ValueError`: a configuration error)."""


class InvalidPreferences(AdapterError, ValueError):
    """A user's preferences (e.g. a reward mix outside [0, 1]) or a malformed preferences file.

    Also a `ValueError`: callers that validate input generically catch it. The message names
    the field (and the file, when one was read).
    """
