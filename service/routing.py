"""Which model a request may use: alias resolution and tenant isolation, as pure functions.

A caller names either the personal alias (default `personal`: "my own adapter") or the base
model's served name. Nothing else is accepted: not another user's alias, not a versioned engine
name (`u-<user>-<id>`), not a path. Matching is exact string equality, with no case folding or
Unicode normalization, so look-alike names cannot match. Every refusal is the same
`ModelNotFound`, so a caller cannot probe which users or adapters exist.

No I/O here: the store and the engine are consulted by `fedpersona.service.http.chat` once the
route is known.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from fedpersona.adapters.errors import InvalidName
from fedpersona.adapters.refs import check_engine_adapter_name
from fedpersona.service.errors import ModelNotFound, PromptTooLong


class ModelKind(StrEnum):
    PERSONAL = "personal"
    BASE = "base"


@dataclass(frozen=True)
class ModelRoute:
    kind: ModelKind
    public_name: str  # what the client asked for, written back into every response


def resolve_model(requested: str, *, alias: str, base_model: str) -> ModelRoute:
    if requested == alias:
        return ModelRoute(ModelKind.PERSONAL, alias)
    if requested == base_model:
        return ModelRoute(ModelKind.BASE, base_model)
    raise ModelNotFound()


def visible_models(*, alias: str, base_model: str) -> list[str]:
    """Model ids a user may use, in the order `/v1/models` lists them."""
    return [alias, base_model]


def check_engine_name(user: str, engine_name: str) -> str:
    """Defence in depth: refuse to forward a name that is not `user`'s own adapter.

    The adapter manager builds names with `engine_adapter_name`; a name that does not parse as
    one of `user`'s (`u-<user>-<version id>`, owned by `fedpersona.adapters.refs`) is a bug,
    never a client error, so it raises `RuntimeError` (a 500) rather than a 4xx.
    """
    try:
        return check_engine_adapter_name(user, engine_name)
    except InvalidName as e:
        raise RuntimeError(f"adapter manager returned {engine_name!r} for user {user!r}") from e


def check_prompt_fits(
    *,
    prompt_bytes: int,
    max_output_tokens: int | None,
    max_model_len: int,
    max_bytes_per_token: int,
) -> None:
    """Refuse requests that cannot fit whatever the tokenizer does; the engine checks exactly.

    A prompt of `b` bytes has at least `ceil(b / max_bytes_per_token)` tokens, so this only
    refuses what is certainly too long and never a request vLLM would have served.
    """
    if max_output_tokens is not None and max_output_tokens >= max_model_len:
        raise PromptTooLong(
            f"max_tokens={max_output_tokens} leaves no room for the prompt: the model's "
            f"context length is {max_model_len} tokens.",
            param="max_tokens",
        )
    min_prompt_tokens = -(-prompt_bytes // max_bytes_per_token)
    if min_prompt_tokens + (max_output_tokens or 0) > max_model_len:
        raise PromptTooLong(
            f"The prompt has at least {min_prompt_tokens} tokens, more than the model's "
            f"context length of {max_model_len} tokens allows"
            + (f" with max_tokens={max_output_tokens}." if max_output_tokens else "."),
            param="messages",
        )
