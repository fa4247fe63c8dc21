"""Domain errors of proxy tuning (FedPT serving).

`ValueError` subclasses, so vLLM's request validation (`LogitsProcessor.validate_params`) turns
them into an HTTP 400 whose message is ours; the gateway reads that status and message and never
has to parse vLLM internals. This module knows nothing about vLLM or HTTP.
"""

from __future__ import annotations


class ProxyTuningError(ValueError):
    """Base class of the proxy-tuning errors."""


class IncompatibleModels(ProxyTuningError):
    """The small and the large model cannot be combined (tokenizer or vocabulary differ).

    Raised when the processor starts, so the engine refuses to come up instead of serving
    logits that mix two different token spaces.
    """


class InvalidExpertRequest(ProxyTuningError):
    """The per-request arguments (`fedpersona_expert`, `fedpersona_alpha`) are malformed."""


class ExpertUnavailable(ProxyTuningError):
    """The named expert is missing from the store, invalid, or does not fit the small model."""
