"""User ids and slots: which names exist in the store, checked strictly.

A `Slot` is a place in the store that holds a sequence of adapter versions. Its `path` is a
relative POSIX path that the store joins under its root, and that the gateway and the vLLM
logits processor receive from the outside (`"<slot path>@<version id>"`), so parsing is strict:
only the five shapes below exist, every component is checked against a whitelist pattern, and
nothing like `..`, an absolute path or an empty component can get through.

    users/<user>/served      the LoRA vLLM serves for <user> (e.g. global + personal composed)
    users/<user>/personal    <user>'s personal LoRA (never aggregated)
    users/<user>/expert      <user>'s proxy-tuning expert (LoRA on the small model)
    global/adapters/<name>   a global adapter aggregated across users
    global/expert            the federated proxy-tuning expert

Pure: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from fedpersona.adapters.errors import InvalidName

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
# The rule in words, for messages people read (a regex printed through a terminal's markup
# lost its character classes).
NAME_RULE = (
    "1 to 63 characters: lower-case letters a-z, digits 0-9, '_' and '-', "
    "starting with a letter or a digit"
)


def validate_user_id(user: str) -> str:
    """Return `user` unchanged if it is a valid user id, else raise `InvalidName`.

    Valid ids match `^[a-z0-9][a-z0-9_-]{0,62}$`: lower-case ASCII, so they are safe as one
    path component and as part of a vLLM adapter name.
    """
    return _check_name(user, what="user id")


def validate_adapter_name(name: str) -> str:
    """Return `name` unchanged if it is a valid global adapter name (same rule as user ids)."""
    return _check_name(name, what="adapter name")


def _check_name(value: object, *, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidName(f"{what} must be a string, got {type(value).__name__}")
    if _NAME_RE.fullmatch(value) is None:
        raise InvalidName(f"invalid {what} {value!r}: use {NAME_RULE}")
    return value


class SlotKind(StrEnum):
    """The five kinds of slot."""

    USER_SERVED = "served"
    USER_PERSONAL = "personal"
    USER_EXPERT = "expert"
    GLOBAL_ADAPTER = "global_adapter"
    GLOBAL_EXPERT = "global_expert"


_USER_KINDS = {
    "served": SlotKind.USER_SERVED,
    "personal": SlotKind.USER_PERSONAL,
    "expert": SlotKind.USER_EXPERT,
}


@dataclass(frozen=True, order=True)
class Slot:
    """One place in the store. Build it with the constructors or `Slot.parse`, not directly."""

    kind: SlotKind
    owner: str | None = None  # the user id for user slots, the adapter name for global adapters

    def __post_init__(self) -> None:
        if not isinstance(self.kind, SlotKind):
            raise InvalidName(f"slot kind must be a SlotKind, got {self.kind!r}")
        if self.kind is SlotKind.GLOBAL_EXPERT:
            if self.owner is not None:
                raise InvalidName("the global expert slot takes no owner")
        elif self.kind is SlotKind.GLOBAL_ADAPTER:
            validate_adapter_name(self.owner)  # type: ignore[arg-type]
        else:
            validate_user_id(self.owner)  # type: ignore[arg-type]

    @classmethod
    def user_served(cls, user: str) -> Slot:
        return cls(SlotKind.USER_SERVED, user)

    @classmethod
    def user_personal(cls, user: str) -> Slot:
        return cls(SlotKind.USER_PERSONAL, user)

    @classmethod
    def user_expert(cls, user: str) -> Slot:
        return cls(SlotKind.USER_EXPERT, user)

    @classmethod
    def global_adapter(cls, name: str) -> Slot:
        return cls(SlotKind.GLOBAL_ADAPTER, name)

    @classmethod
    def global_expert(cls) -> Slot:
        return cls(SlotKind.GLOBAL_EXPERT)

    @property
    def user(self) -> str | None:
        """The user this slot belongs to, or None for global slots."""
        return self.owner if self.kind in _USER_KINDS.values() else None

    @property
    def path(self) -> str:
        """Relative POSIX path of the slot below the store's `slots/` directory."""
        if self.kind is SlotKind.GLOBAL_EXPERT:
            return "global/expert"
        if self.kind is SlotKind.GLOBAL_ADAPTER:
            return f"global/adapters/{self.owner}"
        return f"users/{self.owner}/{self.kind.value}"

    @classmethod
    def parse(cls, path: str) -> Slot:
        """The slot whose `path` is exactly `path`; anything else raises `InvalidName`."""
        if not isinstance(path, str):
            raise InvalidName(f"slot path must be a string, got {type(path).__name__}")
        parts = path.split("/")
        if len(parts) == 3 and parts[0] == "users" and parts[2] in _USER_KINDS:
            return cls(_USER_KINDS[parts[2]], _parse_component(parts[1], path))
        if len(parts) == 3 and parts[:2] == ["global", "adapters"]:
            return cls(SlotKind.GLOBAL_ADAPTER, _parse_component(parts[2], path))
        if parts == ["global", "expert"]:
            return cls(SlotKind.GLOBAL_EXPERT)
        raise InvalidName(
            f"invalid slot path {path!r}: expected users/<user>/(served|personal|expert), "
            "global/adapters/<name> or global/expert"
        )

    def __str__(self) -> str:
        return self.path


def _parse_component(value: str, path: str) -> str:
    try:
        return _check_name(value, what="name")
    except InvalidName as e:
        raise InvalidName(f"invalid slot path {path!r}: {e}") from e
