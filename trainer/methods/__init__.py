"""The federated methods, by name: `get_method("fedavg" | "fedprox" | "local" | "pftt" | "perfit")`.

Method modules are imported on demand: they import the training code, which itself imports the
value types re-exported here (`LoraSpec`, `TrainConfig`, ...), so eager imports would be circular.
"""

from __future__ import annotations

import importlib
from typing import Any

from fedpersona.trainer.errors import MethodError
from fedpersona.trainer.methods.base import (
    ClientUpdate,
    LoraSpec,
    Method,
    Params,
    TrainConfig,
)

# name -> (module, class, default options)
_REGISTRY: dict[str, tuple[str, str, dict[str, Any]]] = {
    "fedavg": ("fedpersona.trainer.methods.fedavg", "FedAvg", {}),
    "fedprox": (
        "fedpersona.trainer.methods.fedavg",
        "FedAvg",
        {"prox_mu": 0.01, "name": "fedprox"},
    ),
    "local": ("fedpersona.trainer.methods.local", "LocalOnly", {}),
    "pftt": ("fedpersona.trainer.methods.pftt", "Pftt", {}),
    "perfit": ("fedpersona.trainer.methods.perfit", "PerFit", {}),
    # FedPT: FedAvg on the SMALL model, published as proxy experts (trainer/methods/fedpt.py).
    "fedpt": ("fedpersona.trainer.methods.fedpt", "FedPT", {}),
}

METHODS: tuple[str, ...] = tuple(_REGISTRY)


def get_method(name: str, **options: Any) -> Method:
    """The method called `name`, built with `options` (its dataclass fields, e.g. `spec=`)."""
    if name not in _REGISTRY:
        raise MethodError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")
    module, cls, defaults = _REGISTRY[name]
    factory = getattr(importlib.import_module(module), cls)
    try:
        method: Method = factory(**{**defaults, **options})
    except TypeError as e:
        raise MethodError(f"invalid options for method {name!r}: {e}") from e
    return method


__all__ = [
    "METHODS",
    "ClientUpdate",
    "LoraSpec",
    "Method",
    "Params",
    "TrainConfig",
    "get_method",
]
