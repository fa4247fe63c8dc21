"""Build fedpersona's wheel offline and install it into a folder, away from the checkout.

The build runs on a copy of the sources (pyproject.toml, README.md and the package folders), so
it leaves no `build/` or `*.egg-info` behind in the working tree. `pip wheel --no-deps
--no-build-isolation --no-index` uses the setuptools already installed: no network.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def build_wheel(workdir: Path) -> Path:
    """The path of a freshly built `fedpersona-*.whl` under `workdir`."""
    source = workdir / "src"
    source.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    for folder in set(config["tool"]["setuptools"]["package-dir"].values()):
        shutil.copytree(
            REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    out = workdir / "dist"
    subprocess.run(
        [
            sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
            "--no-index", "--quiet", "--wheel-dir", str(out), str(source),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )  # fmt: skip
    (wheel,) = out.glob("fedpersona-*.whl")
    return wheel


def install_wheel(wheel: Path, target: Path) -> Path:
    """Unpack `wheel` (no dependencies, no bytecode) into `target`, for PYTHONPATH."""
    subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile",
            "--quiet", "--target", str(target), str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )  # fmt: skip
    return target


# Our folders' names, and other PyPI packages' import names (AdapterHub, Coqui TTS, ...).
SHADOWED = ("adapters", "trainer", "service")


def shadow_packages(root: Path, names: tuple[str, ...] = SHADOWED) -> Path:
    """Top-level packages named like ours' folders (AdapterHub's `adapters`, Coqui's `trainer`)
    that fail loudly when imported: put `root` first on sys.path to prove nothing imports them."""
    for name in names:
        package = root / name
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(
            f"raise ImportError('the unrelated top-level package {name!r} was imported')\n"
        )
    return root
