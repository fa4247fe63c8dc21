"""A client's method state (personal LoRA, masks) across rounds and runs, bound to what made it.

Within a run the state lives in Flower's `context.state`. Across runs it lives in the user's silo,
`<silo>/.fedpersona/<algorithm>-state.npz`, next to `<algorithm>-state.json`, the *binding*: the
base model (name and recipe hash) and the method's settings (`method_settings`) it was trained
with. A run reads the silo's state only when it resumes (`RunConfig.resume`) and the binding
matches; a run that does not resume starts every user from the method's seeded initialization
(what `fedpersona eval` and the benchmark do, so no method of a comparison inherits an earlier
run's personal adapters); a resuming run whose binding does not match resets that user's state
(the user starts from the method's initialization, as the global checkpoint does when its shapes
changed) and logs a warning that names the file and both bindings, rather than loading another
model's or another setting's parameters into this run's LoRAs.

This module knows the silo layout of client state and Flower's `Context`; nothing about what a
method keeps.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from fedpersona.trainer.flower.packing import pack, unpack
from fedpersona.trainer.methods.base import Method, Params, method_settings
from fedpersona.trainer.models.basemodel import ModelInfo
from flwr.app import Context

log = logging.getLogger(__name__)

STATE_KEY = "fedpersona-state"
STATE_DIR = ".fedpersona"


def binding_of(method: Method, base_model: ModelInfo) -> dict[str, Any]:
    """What a state is bound to: the base model and the method's settings (JSON-safe)."""
    return {
        "base_model": base_model.name,
        "base_model_recipe": base_model.recipe_hash,
        "method": method_settings(method),
    }


def save_params(path: Path, params: Params) -> None:
    """Write `params` as .npz atomically (temporary file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    savez: Any = np.savez
    with open(tmp, "wb") as f:
        savez(f, **params)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_params(path: Path) -> Params:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _write_json(path: Path, value: object) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class ClientState:
    """One user's state of one method: `context.state` within a run, the silo across runs."""

    def __init__(
        self,
        context: Context,
        silo: Path,
        algorithm: str,
        *,
        binding: dict[str, Any],
        resume: bool,
    ) -> None:
        self.context = context
        self.key = f"{STATE_KEY}-{algorithm}"
        self.file = Path(silo) / STATE_DIR / f"{algorithm}-state.npz"
        self.binding_file = self.file.with_suffix(".json")
        self.binding = json.loads(json.dumps(binding))
        self.resume = resume

    def load(self) -> Params:
        if self.key in self.context.state.array_records:
            return unpack(self.context.state.array_records[self.key])
        if not self.file.is_file():
            return {}
        if not self.resume:
            log.info("%s: not resuming, so this user starts without it", self.file)
            return {}
        found = self._stored_binding()
        if found != self.binding:
            log.warning(
                "%s holds personal state trained with %s, but this run trains %s: this user "
                "starts afresh (the file is replaced after their first round)",
                self.file,
                _describe(found),
                _describe(self.binding),
            )
            return {}
        return load_params(self.file)

    def save(self, state: Params) -> None:
        self.context.state[self.key] = pack(state)
        save_params(self.file, state)
        _write_json(self.binding_file, self.binding)

    def _stored_binding(self) -> dict[str, Any] | None:
        try:
            value = json.loads(self.binding_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None


def _describe(binding: dict[str, Any] | None) -> str:
    if binding is None:
        return "unknown settings (no binding file: written by an older fedpersona)"
    method = binding.get("method", {})
    return f"base model {binding.get('base_model')!r} and method settings {method}"
