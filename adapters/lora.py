"""`LoraAdapter`: a plain LoRA in memory, and its PEFT directory format on disk.

On disk an adapter is what PEFT's `save_pretrained` writes and what vLLM loads:

    adapter_config.json        peft_type "LORA", r, lora_alpha, target_modules,
                               base_model_name_or_path (the base model's *name*), bias "none", ...
    adapter_model.safetensors  "<module>.lora_A.weight" [r, in] and "<module>.lora_B.weight"
                               [out, r], e.g. "base_model.model.model.layers.0.self_attn.q_proj"

In memory a `LoraAdapter` is exactly the part vLLM uses: one rank `r`, one `alpha` (the update
of a module is `alpha / r * B @ A`), the target module names, the base model's name and the
tensors under their PEFT key names. Its constructor checks the tensors' structure, so an
instance is always a well-formed LoRA. `load_lora` refuses PEFT features this representation
(and vLLM) cannot express: DoRA, bias, modules_to_save, per-module rank/alpha patterns,
weight-modifying inits. rsLoRA adapters are accepted and normalised (their `alpha / sqrt(r)`
scaling is rewritten as an equivalent `alpha' / r`).

Policy checks that depend on the deployment (maximum rank, expected base model, finite
weights) live in `validation.py`; the store lives in `store.py`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fedpersona.adapters.errors import InvalidAdapter
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)

_A_SUFFIX = ".lora_A.weight"
_B_SUFFIX = ".lora_B.weight"


def lora_keys(module: str) -> tuple[str, str]:
    """The PEFT tensor keys of `module`'s A and B matrices."""
    return module + _A_SUFFIX, module + _B_SUFFIX


@dataclass(frozen=True, eq=False)
class LoraAdapter:
    """A LoRA adapter: for every module `m`, `W_m += alpha / r * B_m @ A_m`.

    `tensors` maps PEFT key names (`<module>.lora_A.weight` [r, in], `<module>.lora_B.weight`
    [out, r]) to tensors. Every module must be matched by `target_modules` as PEFT matches a
    list (its name is a target, or ends with "." + a target).
    Compared by identity (tensors have no single truth value).
    """

    r: int
    alpha: float
    target_modules: tuple[str, ...]
    base_model: str
    tensors: Mapping[str, torch.Tensor] = field(repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise InvalidAdapter(f"r must be a positive integer, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float):
            raise InvalidAdapter(f"lora_alpha must be a number, got {self.alpha!r}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise InvalidAdapter(f"lora_alpha must be positive and finite, got {self.alpha!r}")
        if not isinstance(self.base_model, str) or not self.base_model:
            raise InvalidAdapter("base_model_name_or_path must be a non-empty string")
        targets = tuple(sorted(set(self.target_modules)))
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise InvalidAdapter(
                f"target_modules must be a non-empty list of module names, got "
                f"{list(self.target_modules)!r}"
            )
        object.__setattr__(self, "target_modules", targets)
        object.__setattr__(self, "tensors", dict(self.tensors))
        _check_structure(self.tensors, r=self.r, target_modules=targets)

    @property
    def scaling(self) -> float:
        """The factor PEFT and vLLM apply to `B @ A`."""
        return self.alpha / self.r

    def modules(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """`{module: (A, B)}` in sorted module order."""
        names = sorted(k[: -len(_A_SUFFIX)] for k in self.tensors if k.endswith(_A_SUFFIX))
        return {m: (self.tensors[m + _A_SUFFIX], self.tensors[m + _B_SUFFIX]) for m in names}

    def delta(self, module: str) -> torch.Tensor:
        """The weight update `alpha / r * B @ A` of `module` ([out, in])."""
        a_key, b_key = lora_keys(module)
        if a_key not in self.tensors:
            raise KeyError(module)
        return self.scaling * (self.tensors[b_key] @ self.tensors[a_key])


def _check_structure(
    tensors: Mapping[str, torch.Tensor], *, r: int, target_modules: tuple[str, ...]
) -> None:
    if not tensors:
        raise InvalidAdapter("the adapter has no LoRA tensors")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise InvalidAdapter(f"tensor {key!r} is a {type(tensor).__name__}, not a tensor")
        if key.endswith(_A_SUFFIX):
            modules.setdefault(key[: -len(_A_SUFFIX)], {})["A"] = tensor
        elif key.endswith(_B_SUFFIX):
            modules.setdefault(key[: -len(_B_SUFFIX)], {})["B"] = tensor
        else:
            raise InvalidAdapter(f"tensor {key!r} is not a LoRA weight: {_explain_key(key)}")
    for module, pair in sorted(modules.items()):
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise InvalidAdapter(f"module {module!r} has no {missing} tensor")
        a, b = pair["A"], pair["B"]
        if not (a.is_floating_point() and b.is_floating_point()):
            raise InvalidAdapter(f"module {module!r}: LoRA tensors must be floating point")
        if a.dim() != 2 or b.dim() != 2:
            raise InvalidAdapter(
                f"module {module!r}: lora_A and lora_B must be matrices, got shapes "
                f"{tuple(a.shape)} and {tuple(b.shape)}"
            )
        if a.shape[0] != r or b.shape[1] != r:
            raise InvalidAdapter(
                f"module {module!r}: shapes lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} "
                f"disagree with r={r} (expected [{r}, in] and [out, {r}])"
            )
        if a.shape[1] == 0 or b.shape[0] == 0:
            raise InvalidAdapter(f"module {module!r}: empty in/out dimension")
        if not _targeted(module, target_modules):
            target = module.rsplit(".", 1)[-1]
            raise InvalidAdapter(
                f"module {module!r} has LoRA weights but {target!r} is not in target_modules "
                f"{list(target_modules)}"
            )


def _targeted(module: str, target_modules: tuple[str, ...]) -> bool:
    """PEFT's rule for a list of targets: the module's name is a target or ends with '.target'."""
    name = module.removeprefix("base_model.model.")
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _explain_key(key: str) -> str:
    if key.endswith(".bias") or ".lora_bias" in key:
        return "adapter bias is not supported by vLLM"
    if "lora_magnitude_vector" in key:
        return "DoRA is not supported by vLLM"
    if "lora_embedding_" in key:
        return "LoRA on embeddings is not supported by this store"
    if "modules_to_save" in key or ".lora_" not in key:
        return "looks like a fully saved module (modules_to_save), which vLLM does not serve"
    return "expected '<module>.lora_A.weight' or '<module>.lora_B.weight'"


# PEFT config fields that change what the adapter computes in ways this representation and
# vLLM do not express; a value other than the "off" value is refused.
_REFUSED_FEATURES: dict[str, tuple[Any, str]] = {
    "use_dora": (False, "DoRA is not supported by vLLM"),
    "lora_bias": (False, "LoRA bias is not supported by vLLM"),
    "use_qalora": (False, "QALoRA is not supported by vLLM"),
    "layer_replication": (None, "layer_replication is not supported by vLLM"),
    "alora_invocation_tokens": (None, "activated LoRA is not supported by vLLM"),
    "use_bdlora": (None, "block-diagonal LoRA is not supported by vLLM"),
    "fan_in_fan_out": (False, "fan_in_fan_out (Conv1D layout) is not supported"),
}
# PEFT config fields that must be absent or empty, and why.
_MUST_BE_EMPTY: dict[str, str] = {
    "modules_to_save": "fully saved modules are not served by vLLM as LoRA",
    "rank_pattern": "per-module ranks are not supported by this store",
    "alpha_pattern": "per-module alphas are not supported by this store",
    "layers_to_transform": "partial-layer LoRA is not supported by this store",
}
_SAFE_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")


def _parse_config(data: object, *, where: str) -> tuple[int, float, tuple[str, ...], str]:
    """Check a PEFT adapter_config dict; return (r, effective alpha, targets, base model)."""
    if not isinstance(data, dict):
        raise InvalidAdapter(f"{where}: expected a JSON object")
    peft_type = data.get("peft_type")
    if peft_type != "LORA":
        raise InvalidAdapter(f"{where}: field 'peft_type' must be \"LORA\", got {peft_type!r}")
    for name in ("r", "lora_alpha", "target_modules", "base_model_name_or_path"):
        if name not in data:
            raise InvalidAdapter(f"{where}: required field {name!r} is missing")
    for name, (off, reason) in _REFUSED_FEATURES.items():
        if data.get(name, off) not in (off, None, False):
            raise InvalidAdapter(f"{where}: field {name!r}={data[name]!r}: {reason}")
    for name, reason in _MUST_BE_EMPTY.items():
        if data.get(name):
            raise InvalidAdapter(f"{where}: field {name!r}={data[name]!r} must be empty: {reason}")
    bias = data.get("bias", "none")
    if bias != "none":
        raise InvalidAdapter(f"{where}: field 'bias'={bias!r}: vLLM supports only \"none\"")
    init = data.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _SAFE_INITS:
        raise InvalidAdapter(
            f"{where}: field 'init_lora_weights'={init!r} modifies the base weights; "
            "convert it to a plain LoRA first"
        )
    r, alpha, targets = data["r"], data["lora_alpha"], data["target_modules"]
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise InvalidAdapter(f"{where}: field 'r' must be a positive integer, got {r!r}")
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, int | float)
        or not (alpha > 0 and math.isfinite(alpha))
    ):
        raise InvalidAdapter(
            f"{where}: field 'lora_alpha' must be a positive finite number, got {alpha!r}"
        )
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise InvalidAdapter(
            f"{where}: field 'target_modules' must be a non-empty list of module names "
            f"(regex strings are not supported), got {targets!r}"
        )
    base = data["base_model_name_or_path"]
    if not isinstance(base, str) or not base:
        raise InvalidAdapter(f"{where}: field 'base_model_name_or_path' must be a non-empty string")
    use_rslora = data.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise InvalidAdapter(f"{where}: field 'use_rslora' must be a boolean")
    # rsLoRA scales by alpha / sqrt(r); the same update is alpha * sqrt(r) / r.
    effective_alpha = float(alpha) * math.sqrt(r) if use_rslora else alpha
    return r, effective_alpha, tuple(targets), base


def adapter_config(adapter: LoraAdapter) -> dict[str, Any]:
    """The adapter_config.json contents PEFT and vLLM load `adapter` from."""
    return {
        "alpha_pattern": {},
        "base_model_name_or_path": adapter.base_model,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": adapter.alpha,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": adapter.r,
        "rank_pattern": {},
        "target_modules": list(adapter.target_modules),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }


def save_lora(adapter: LoraAdapter, out_dir: str | Path) -> Path:
    """Write `adapter` as a PEFT directory (created if needed); return the directory.

    The bytes are a function of the adapter alone, so saving the same adapter twice gives the
    same content hash in the store. Does not fsync; the store does that when it publishes.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(adapter_config(adapter), indent=2, sort_keys=True) + "\n"
    (out / CONFIG_FILE).write_text(text, encoding="utf-8")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sorted(adapter.tensors.items())}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    return out


def read_config(path: Path) -> dict[str, Any]:
    """Parse `path` (an adapter_config.json) as JSON, raising `InvalidAdapter` on failure."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise InvalidAdapter(f"{path}: missing (a PEFT adapter needs {CONFIG_FILE})") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidAdapter(f"{path}: not readable JSON: {e}") from e
    if not isinstance(data, dict):
        raise InvalidAdapter(f"{path}: expected a JSON object")
    return data


def load_lora(path: str | Path) -> LoraAdapter:
    """Load the PEFT adapter directory `path`, raising `InvalidAdapter` naming what is wrong."""
    root = Path(path)
    if not root.is_dir():
        raise InvalidAdapter(f"{root}: not a directory")
    config_path = root / CONFIG_FILE
    r, alpha, targets, base = _parse_config(read_config(config_path), where=str(config_path))
    weights_path = root / WEIGHTS_FILE
    if not weights_path.is_file():
        raise InvalidAdapter(f"{weights_path}: missing (a PEFT adapter needs {WEIGHTS_FILE})")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise InvalidAdapter(f"{weights_path}: not a readable safetensors file: {e}") from e
    try:
        return LoraAdapter(
            r=r, alpha=alpha, target_modules=targets, base_model=base, tensors=tensors
        )
    except InvalidAdapter as e:
        raise InvalidAdapter(f"{weights_path}: {e} (config: {config_path})") from e
