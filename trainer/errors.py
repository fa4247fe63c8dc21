"""Domain errors of the trainer.

Everything the trainer raises on purpose derives from `TrainerError`, so callers (the round
controller, the CLI) can report the family without catching bugs. The errors that describe bad
input are also `ValueError`s. This module knows nothing about Flower, HTTP or the CLI.
"""

from __future__ import annotations


class TrainerError(Exception):
    """Base class of the trainer's errors."""


class DataError(TrainerError, ValueError):
    """A user's silo or a corpus that cannot be used: missing file, bad JSON, bad chat.

    The message names the file (and line) and what is wrong with it.
    """


class MethodError(TrainerError, ValueError):
    """An unknown method, an invalid method option or a client state a method cannot use."""


class AggregationError(TrainerError, ValueError):
    """Client results that cannot be aggregated (no results, mismatched keys or shapes)."""


class RoundBusy(TrainerError):
    """A training run is already in progress (the gateway answers 409)."""


class InvalidRoundSpec(TrainerError, ValueError):
    """A round spec this trainer cannot run; `param` names the offending field (HTTP 400)."""

    param: str | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        if param is not None:
            self.param = param


class NoSilo(InvalidRoundSpec):
    """A run names a user without a silo, or the home has no silos at all."""

    param = "users"


class RunNotFound(TrainerError, LookupError):
    """No run record has this id (or the id is malformed)."""


class RoundsUnreachable(TrainerError):
    """The round controller cannot be reached or refused this caller (HTTP 503)."""


class ConfigError(TrainerError, ValueError):
    """A Flower run config or node config value is missing or malformed."""


class RoundFailed(TrainerError):
    """A federated round could not complete (a client failed or replied badly)."""


class ReplyRefused(TrainerError):
    """A client's reply the server drops: its node may not speak for that user, or it is
    malformed."""


class PublishError(TrainerError):
    """A round's adapters could not be built or staged; nothing of the round was published."""


class ModelImportError(TrainerError, ValueError):
    """A model source that cannot be imported: missing, corrupt, truncated, unsupported, or a
    small/large pair whose tokenizers differ. Nothing was written."""


class WireFormatError(TrainerError, ValueError):
    """A Flower message's packed parameters that cannot be read (truncated, bad index)."""


class RewardModelError(TrainerError, ValueError):
    """A reward model directory that cannot be used (missing, not a one-output sequence
    classifier)."""
