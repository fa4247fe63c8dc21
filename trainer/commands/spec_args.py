"""Command-line flags generated from `RoundSpec`: one definition of a run's training settings.

`add_spec_arguments(parser)` adds one flag per `RoundSpec` field (`local_steps` ->
`--local-steps`), with the field's type, default and description; `spec_from_args(args)` builds
the `RoundSpec` back from the parsed flags, so pydantic validates command-line values exactly as
it validates the HTTP API's JSON. `fedpersona train`, `fedpersona eval` and the benchmarks use
these instead of typing the flags themselves; a command may leave fields out or change their
defaults. This module knows argparse and `RoundSpec`; nothing about training.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Collection, Mapping
from typing import Any

from fedpersona.trainer.methods import method_names
from fedpersona.trainer.rounds.records import RoundSpec


def flag(field: str) -> str:
    """The command-line flag of a `RoundSpec` field."""
    return "--" + field.replace("_", "-")


def comma_list(text: str) -> tuple[str, ...]:
    """`"a, b"` -> `("a", "b")`: how a tuple field is written on the command line."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _is_tuple(annotation: Any) -> bool:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_is_tuple(arg) for arg in typing.get_args(annotation))
    return typing.get_origin(annotation) is tuple


def add_spec_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    *,
    exclude: Collection[str] = (),
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """One flag per `RoundSpec` field not in `exclude`; `defaults` replaces some defaults."""
    unknown = (set(exclude) | set(defaults or {})) - set(RoundSpec.model_fields)
    if unknown:
        raise ValueError(f"not RoundSpec fields: {sorted(unknown)}")
    for name, info in RoundSpec.model_fields.items():
        if name in exclude:
            continue
        default = (defaults or {}).get(name, info.default)
        kwargs: dict[str, Any] = {"default": default}
        if name == "algorithm":
            kwargs["choices"] = method_names()
        elif typing.get_origin(info.annotation) is typing.Literal:
            kwargs["choices"] = typing.get_args(info.annotation)
        elif _is_tuple(info.annotation):
            kwargs["type"] = comma_list
            kwargs["metavar"] = "A,B"
        elif info.annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif info.annotation in (int, float, str):
            kwargs["type"] = info.annotation
        else:
            raise TypeError(f"RoundSpec.{name}: no command-line form for {info.annotation!r}")
        shown = ",".join(default) if isinstance(default, tuple) else default
        suffix = "" if default is None else f" (default: {shown})"
        kwargs["help"] = f"{info.description or name}{suffix}".replace("%", "%%")
        parser.add_argument(flag(name), **kwargs)


def spec_from_args(args: argparse.Namespace, **overrides: Any) -> RoundSpec:
    """The `RoundSpec` of parsed flags; `overrides` win (fields a command sets itself)."""
    values = {name: getattr(args, name) for name in RoundSpec.model_fields if hasattr(args, name)}
    values.update(overrides)
    return RoundSpec(**values)
