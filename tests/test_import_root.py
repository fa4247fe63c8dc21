"""One import root: the wheel installs `fedpersona` only, and bare names cannot collide.

The folders `adapters/`, `trainer/` and `service/` are installed as `fedpersona.adapters`, ...:
the wheel's only top-level import name is `fedpersona`, so AdapterHub's `adapters` or Coqui's
`trainer` installed beside it can neither overwrite our files nor be imported in their place.
The shadow test puts packages with those bare names first on `sys.path` (each raises when
imported) and checks, in a fresh interpreter, that everything other programs import by name
still resolves to ours: the CLI with all its subcommands, the vLLM logits-processor path and the
Flower App components (from the wheel installed into a folder, and from the checkout).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from support.wheel import REPO, SHADOWED, build_wheel, install_wheel, shadow_packages

PROCESSOR = "fedpersona.service.proxy_tuning.processor:ProxyTuningLogitsProcessor"
FLWR_APP = REPO / "trainer" / "flower" / "flwr_app" / "pyproject.toml"

pytestmark = pytest.mark.slow

CHECK = """
import importlib, json, sys
from fedpersona.cli import build_parser

build_parser()  # imports every subcommand module of both packages and the root
targets = json.loads(sys.argv[1])
loaded = {}
for target in targets:
    module, _, attr = target.partition(":")
    imported = importlib.import_module(module)
    getattr(imported, attr)
    loaded[target] = imported.__file__
import fedpersona
print(json.dumps({
    "loaded": loaded,
    "fedpersona": fedpersona.__file__,
    "bare": sorted(n for n in json.loads(sys.argv[2]) if n in sys.modules),
}))
"""


def flower_components() -> list[str]:
    components = tomllib.loads(FLWR_APP.read_text())["tool"]["flwr"]["app"]["components"]
    return [components["serverapp"], components["clientapp"]]


def check_in_subprocess(pythonpath: list[Path], *, root: Path) -> None:
    """Import, with `pythonpath`, the CLI and every by-name entry point; all must come from
    `root` and no bare-named package may be imported."""
    targets = [PROCESSOR, *flower_components()]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in pythonpath)}
    result = subprocess.run(
        [sys.executable, "-c", CHECK, json.dumps(targets), json.dumps(SHADOWED)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=pythonpath[0],  # not the checkout: its folders must not be importable by bare name
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["bare"] == []
    assert Path(str(report["fedpersona"])).is_relative_to(root)
    loaded = report["loaded"]
    assert isinstance(loaded, dict) and set(loaded) == set(targets)
    for target, file in loaded.items():
        assert Path(file).is_relative_to(root), (target, file)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def test_the_wheel_installs_one_top_level_name(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"fedpersona"}
    for required in (
        "fedpersona/trainer/rounds/interface.py",
        "fedpersona/trainer/flower/flwr_app/pyproject.toml",
        "fedpersona/service/proxy_tuning/processor.py",
        "fedpersona/adapters/__init__.py",
        "fedpersona/trainer_api.py",
    ):
        assert required in names
    (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")] or [None]
    if top_level is not None:
        assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["fedpersona"]


def test_bare_names_first_on_the_path_change_nothing_for_the_installed_wheel(
    wheel: Path, tmp_path: Path
) -> None:
    target = install_wheel(wheel, tmp_path / "site")
    fakes = shadow_packages(tmp_path / "shadow")
    check_in_subprocess([fakes, target], root=target)  # the wheel's copy, not the checkout


def test_bare_names_first_on_the_path_change_nothing_for_the_checkout(tmp_path: Path) -> None:
    fakes = shadow_packages(tmp_path / "shadow")
    check_in_subprocess([fakes], root=REPO)  # the editable install
