"""The adapter store: the contract between the federated trainer and the serving gateway.

Imports neither `trainer` nor `service`. See `docs/contracts.md` ("Adapters") for the API and
`adapters/store.py` for the on-disk layout and its crash-safety argument. Besides the store it
owns every fact both sides share: the home layout (`home.py`), model manifests
(`manifest.py`), rank limits (`limits.py`), version ids (`version.py`) and the names versions
travel under outside the store (`refs.py`).

The read side (names, versions, manifests, the home, reading the store) imports without torch:
the torch-backed names (`LoraAdapter`, `load_lora`, `save_lora`, `compose`, `validate_adapter`,
`validate_adapter_dir`) are imported from their modules on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fedpersona.adapters.errors import (
    AdapterError,
    InvalidAdapter,
    InvalidManifest,
    InvalidName,
    NotFound,
    RankLimitMismatch,
    ReadOnlyStore,
    StoreCorrupt,
)
from fedpersona.adapters.home import Home, resolve_home
from fedpersona.adapters.limits import EXPERT_MAX_RANK, MAX_LORA_RANK, check_engine_rank
from fedpersona.adapters.manifest import ModelManifest, read_model_manifest, write_model_manifest
from fedpersona.adapters.names import Slot, SlotKind, validate_adapter_name, validate_user_id
from fedpersona.adapters.refs import (
    ExpertRef,
    check_engine_adapter_name,
    engine_adapter_name,
    proxy_xargs,
)
from fedpersona.adapters.store import AdapterStore
from fedpersona.adapters.version import Version, check_version_id, content_id

if TYPE_CHECKING:
    from fedpersona.adapters.compose import compose
    from fedpersona.adapters.lora import LoraAdapter, load_lora, save_lora
    from fedpersona.adapters.validation import validate_adapter, validate_adapter_dir

# Names whose modules import torch: loaded on first access (PEP 562).
_TORCH_NAMES = {
    "compose": "fedpersona.adapters.compose",
    "LoraAdapter": "fedpersona.adapters.lora",
    "load_lora": "fedpersona.adapters.lora",
    "save_lora": "fedpersona.adapters.lora",
    "validate_adapter": "fedpersona.adapters.validation",
    "validate_adapter_dir": "fedpersona.adapters.validation",
}


def __getattr__(name: str) -> Any:
    module = _TORCH_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "EXPERT_MAX_RANK",
    "MAX_LORA_RANK",
    "AdapterError",
    "AdapterStore",
    "ExpertRef",
    "Home",
    "InvalidAdapter",
    "InvalidManifest",
    "InvalidName",
    "LoraAdapter",
    "ModelManifest",
    "NotFound",
    "RankLimitMismatch",
    "ReadOnlyStore",
    "Slot",
    "SlotKind",
    "StoreCorrupt",
    "Version",
    "check_engine_adapter_name",
    "check_engine_rank",
    "check_version_id",
    "compose",
    "content_id",
    "engine_adapter_name",
    "load_lora",
    "proxy_xargs",
    "read_model_manifest",
    "resolve_home",
    "save_lora",
    "validate_adapter",
    "validate_adapter_dir",
    "validate_adapter_name",
    "validate_user_id",
    "write_model_manifest",
]
