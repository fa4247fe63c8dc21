"""The registry of federated methods: every list of methods in fedpersona is derived from it.

`get_method(name, **options)` builds a method; `method_names()` lists them (the CLI's
`--algorithm` choices, `RoundSpec.algorithm`, the Flower App config, `fedpersona eval`);
`behaviour_of(name)` says what a method shares, publishes and trains on. Drivers read the
behaviour and never branch on a name. Built in:

| name    | class                 | what                                                       |
| ------- | --------------------- | ---------------------------------------------------------- |
| fedavg  | `fedavg.FedAvg`       | one LoRA, averaged weighted by examples                    |
| fedprox | `fedavg.FedAvg`       | FedAvg with a proximal term (`prox_mu` 0.01 by default)    |
| fedavg-ft | `fedavg.FedAvgFT`   | FedAvg, then the final global fine-tuned by each user      |
| fedsa   | `fedsa.FedSA`         | FedSA-LoRA: A matrices averaged, B matrices personal       |
| local   | `local.LocalOnly`     | each user's own LoRA, nothing shared                       |
| pftt    | `pftt.Pftt`           | global LoRA (averaged) + personal LoRA, served composed    |
| perfit  | `perfit.PerFit`       | expanded LoRA pruned to a personal sparse architecture     |
| fedpt   | `fedpt.FedPT`         | FedAvg on the small model, published as proxy experts      |
| pfit    | `pfit.Pfit`           | RLHF on each user's reward mix: sparse global + personal   |
| fedrlhf | `pfit.FedRlhf`        | dense federated RLHF: one LoRA trained by RL, averaged     |

`register` adds a method under a new name (the name is also its `global/adapters/<name>` slot,
so it follows the store's adapter-name rule). Importing this package loads no training code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fedpersona.adapters import InvalidName, validate_adapter_name
from fedpersona.trainer.errors import MethodError
from fedpersona.trainer.methods.base import (
    BaseRole,
    Behaviour,
    ClientUpdate,
    LoraMethod,
    LoraSpec,
    Method,
    Params,
    Product,
    Shares,
    TrainConfig,
)
from fedpersona.trainer.methods.fedavg import FedAvg, FedAvgFT
from fedpersona.trainer.methods.fedpt import FedPT
from fedpersona.trainer.methods.fedsa import FedSA
from fedpersona.trainer.methods.local import LocalOnly
from fedpersona.trainer.methods.perfit import PerFit
from fedpersona.trainer.methods.pfit import FedRlhf, Pfit
from fedpersona.trainer.methods.pftt import Pftt

MethodFactory = Callable[..., Method]


@dataclass(frozen=True)
class _Entry:
    factory: MethodFactory
    defaults: Mapping[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, _Entry] = {}


def register(name: str, factory: MethodFactory, **defaults: Any) -> None:
    """Make `factory(name=name, **defaults, **options)` reachable as `name` everywhere."""
    try:
        validate_adapter_name(name)
    except InvalidName as e:
        raise MethodError(f"method name: {e}") from e
    if name in _REGISTRY:
        raise MethodError(f"method {name!r} is already registered")
    _REGISTRY[name] = _Entry(factory=factory, defaults=dict(defaults))


def unregister(name: str) -> None:
    """Remove `name` (tests that register a method of their own clean up with this)."""
    _REGISTRY.pop(name, None)


def method_names() -> tuple[str, ...]:
    """Every registered method, in registration order."""
    return tuple(_REGISTRY)


def get_method(name: str, **options: Any) -> Method:
    """The method called `name`, built with `options` (its dataclass fields, e.g. `spec=`)."""
    entry = _REGISTRY.get(name)
    if entry is None:
        raise MethodError(f"unknown method {name!r}; expected one of {', '.join(method_names())}")
    try:
        method = entry.factory(**{"name": name, **entry.defaults, **options})
    except TypeError as e:
        raise MethodError(f"invalid options for method {name!r}: {e}") from e
    if method.name != name:
        raise MethodError(f"method {name!r} was built under the name {method.name!r}")
    return method


def behaviour_of(name: str) -> Behaviour:
    """What the method `name` (with its default options) shares, publishes and trains on."""
    return get_method(name).behaviour


register("fedavg", FedAvg)
register("fedprox", FedAvg, prox_mu=0.01)
register("local", LocalOnly)
register("pftt", Pftt)
register("perfit", PerFit)
register("fedpt", FedPT)
register("fedavg-ft", FedAvgFT)
register("fedsa", FedSA)
register("pfit", Pfit)
register("fedrlhf", FedRlhf)

__all__ = [
    "BaseRole",
    "Behaviour",
    "ClientUpdate",
    "LoraMethod",
    "LoraSpec",
    "Method",
    "Params",
    "Product",
    "Shares",
    "TrainConfig",
    "behaviour_of",
    "get_method",
    "method_names",
    "register",
    "unregister",
]
