"""Names for store versions outside the store: vLLM adapter names and proxy expert references.

Two formats leave the store and come back from the outside, so both are built and parsed here,
strictly, and nowhere else:

    u-<user>-<version id>      the name vLLM serves a user's served-slot version under
                               (`engine_adapter_name`; the gateway refuses to forward a name
                               `check_engine_adapter_name` does not accept for the caller)
    <slot path>@<version id>   a proxy-tuning expert (`ExpertRef`), sent to vLLM's logits
                               processor in `vllm_xargs[EXPERT_ARG]` with a strength in
                               `vllm_xargs[ALPHA_ARG]` (`proxy_xargs`)

User ids may contain `-`, but a version id is exactly 16 hex digits at the end, so an engine
name has one parse. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedpersona.adapters.errors import InvalidName
from fedpersona.adapters.names import Slot, SlotKind, validate_user_id
from fedpersona.adapters.version import ID_LENGTH, check_version_id

ENGINE_NAME_PREFIX = "u-"
EXPERT_ARG = "fedpersona_expert"
ALPHA_ARG = "fedpersona_alpha"
EXPERT_SLOT_KINDS = frozenset({SlotKind.USER_EXPERT, SlotKind.GLOBAL_EXPERT})


def engine_adapter_name(user: str, version_id: str) -> str:
    """The name vLLM serves `user`'s adapter version under: `u-<user>-<version id>`."""
    validate_user_id(user)
    check_version_id(version_id)
    return f"{ENGINE_NAME_PREFIX}{user}-{version_id}"


def parse_engine_adapter_name(name: object) -> tuple[str, str]:
    """`(user, version id)` of an engine adapter name; anything else raises `InvalidName`."""
    if (
        not isinstance(name, str)
        or not name.startswith(ENGINE_NAME_PREFIX)
        or len(name) < len(ENGINE_NAME_PREFIX) + ID_LENGTH + 2
        or name[-ID_LENGTH - 1] != "-"
    ):
        raise InvalidName(
            f"invalid engine adapter name {name!r}: "
            f"expected {ENGINE_NAME_PREFIX}<user>-<version id>"
        )
    user, version_id = name[len(ENGINE_NAME_PREFIX) : -ID_LENGTH - 1], name[-ID_LENGTH:]
    try:
        return validate_user_id(user), check_version_id(version_id)
    except InvalidName as e:
        raise InvalidName(f"invalid engine adapter name {name!r}: {e}") from e


def check_engine_adapter_name(user: str, name: object) -> str:
    """Return `name` if it is one of `user`'s engine adapter names, else raise `InvalidName`."""
    owner, _ = parse_engine_adapter_name(name)
    if owner != user:
        raise InvalidName(f"engine adapter name {name!r} does not belong to user {user!r}")
    return name  # type: ignore[return-value]  # parse_engine_adapter_name checked it is a str


@dataclass(frozen=True)
class ExpertRef:
    """One immutable proxy expert version: an expert slot and a version id."""

    slot: Slot
    version: str

    def __post_init__(self) -> None:
        if self.slot.kind not in EXPERT_SLOT_KINDS:
            raise InvalidName(
                f"slot {self.slot.path} is not an expert slot "
                "(expected users/<user>/expert or global/expert)"
            )
        check_version_id(self.version)

    @classmethod
    def parse(cls, text: object) -> ExpertRef:
        """Parse `"<slot path>@<version id>"`; raises `InvalidName` naming `EXPERT_ARG`."""
        if not isinstance(text, str):
            raise InvalidName(
                f"{EXPERT_ARG} must be a string '<slot path>@<version id>', "
                f"got {type(text).__name__}"
            )
        path, sep, version = text.partition("@")
        if not sep:
            raise InvalidName(f"{EXPERT_ARG} {text!r} must look like '<slot path>@<version id>'")
        try:
            return cls(Slot.parse(path), version)
        except InvalidName as e:
            raise InvalidName(f"{EXPERT_ARG} {text!r}: {e}") from e

    def __str__(self) -> str:
        return f"{self.slot.path}@{self.version}"


def proxy_xargs(ref: ExpertRef, *, alpha: float) -> dict[str, str | float]:
    """The `vllm_xargs` that switch the proxy-tuning logits processor on for one request."""
    return {EXPERT_ARG: str(ref), ALPHA_ARG: float(alpha)}
