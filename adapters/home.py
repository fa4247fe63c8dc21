"""The fedpersona home: one directory holding all state, and the layout below it.

    <home>/models/large/      the large base model (served by vLLM), `fedpersona.json` inside
    <home>/models/small/      the small base model (proxy-tuning experts)
    <home>/store/             the adapter store (`store.py`); on Kubernetes a shared volume
    <home>/silos/<user>/      one user's private chat data: train.jsonl, eval.jsonl
    <home>/registry.sqlite    gateway users and API key hashes
    <home>/runs/              trainer round records
    <home>/logs/              logs of supervised processes (e.g. vllm.log)

`Home` derives every path from the root; settings may override single paths, never re-derive
them. This module is the one place that knows the environment variable `FEDPERSONA_HOME` and
the default `./.fedpersona`: `resolve_home` reads it for commands, and the pydantic settings
classes use `HOME_ENV` and `DEFAULT_HOME` for their `home` field. It creates nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedpersona.adapters.names import validate_user_id

HOME_ENV = "FEDPERSONA_HOME"
DEFAULT_HOME = Path(".fedpersona")
MODEL_ROLES = ("large", "small")


def resolve_home(
    explicit: Path | str | None = None, *, environ: Mapping[str, str] | None = None
) -> Path:
    """`explicit` (e.g. `--home`), else `$FEDPERSONA_HOME`, else `./.fedpersona` (not resolved)."""
    if explicit is not None:
        return Path(explicit)
    value = (os.environ if environ is None else environ).get(HOME_ENV)
    return Path(value) if value else DEFAULT_HOME


@dataclass(frozen=True)
class Home:
    """The paths below one home directory. Pure: nothing is read or created."""

    root: Path

    @classmethod
    def resolve(
        cls, explicit: Path | str | None = None, *, environ: Mapping[str, str] | None = None
    ) -> Home:
        """The home `resolve_home` names."""
        return cls(resolve_home(explicit, environ=environ))

    @property
    def models(self) -> Path:
        return self.root / "models"

    def model(self, role: str) -> Path:
        """The base model directory of `role` ("large" or "small")."""
        if role not in MODEL_ROLES:
            raise ValueError(f"unknown model role {role!r}; expected one of {MODEL_ROLES}")
        return self.models / role

    @property
    def large_model(self) -> Path:
        return self.model("large")

    @property
    def small_model(self) -> Path:
        return self.model("small")

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def silos(self) -> Path:
        return self.root / "silos"

    def silo(self, user: str) -> Path:
        """`user`'s silo directory (`InvalidName` unless `user` is a valid user id)."""
        return self.silos / validate_user_id(user)

    @property
    def registry(self) -> Path:
        return self.root / "registry.sqlite"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def logs(self) -> Path:
        return self.root / "logs"
