"""The adapter store: the contract between the federated trainer and the serving gateway.

Imports neither `trainer` nor `service`. See `docs/contracts.md` ("Adapters") for the API and
`adapters/store.py` for the on-disk layout and its crash-safety argument.
"""

from fedpersona.adapters.compose import compose
from fedpersona.adapters.errors import (
    AdapterError,
    InvalidAdapter,
    InvalidName,
    NotFound,
    StoreCorrupt,
)
from fedpersona.adapters.lora import LoraAdapter, load_lora, save_lora
from fedpersona.adapters.names import Slot, SlotKind, validate_adapter_name, validate_user_id
from fedpersona.adapters.store import AdapterStore
from fedpersona.adapters.validation import validate_adapter, validate_adapter_dir
from fedpersona.adapters.version import Version, content_id

__all__ = [
    "AdapterError",
    "AdapterStore",
    "InvalidAdapter",
    "InvalidName",
    "LoraAdapter",
    "NotFound",
    "Slot",
    "SlotKind",
    "StoreCorrupt",
    "Version",
    "compose",
    "content_id",
    "load_lora",
    "save_lora",
    "validate_adapter",
    "validate_adapter_dir",
    "validate_adapter_name",
    "validate_user_id",
]
