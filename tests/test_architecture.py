"""The import rules of docs/architecture.md, checked on the source of every module (AST scan).

- `fedpersona.adapters` imports no other fedpersona package (it is the contract);
- `fedpersona.trainer` imports the adapters and itself, never the service or the root;
- `fedpersona.service` imports the adapters, itself, and the trainer only through
  `fedpersona.trainer.rounds.interface`; never the root;
- only the root (`fedpersona/*.py`) may import both sides.

Every `import` counts, also those inside functions or under `TYPE_CHECKING`: a lazy import is
still a dependency. The layout test checks that pyproject's explicit package list is exactly the
folders that are packages, so a new sub-package cannot be left out of the wheel.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Import root -> folder, as pyproject's package-dir maps them.
FOLDERS = {
    "fedpersona": REPO / "fedpersona",
    "fedpersona.adapters": REPO / "adapters",
    "fedpersona.trainer": REPO / "trainer",
    "fedpersona.service": REPO / "service",
}
INTERFACE = "fedpersona.trainer.rounds.interface"


def modules(package: str) -> Iterator[tuple[str, Path]]:
    """(dotted name, path) of every module of `package` (the root: only its own files)."""
    folder = FOLDERS[package]
    files = folder.glob("*.py") if package == "fedpersona" else folder.rglob("*.py")
    for path in sorted(files):
        parts = list(path.relative_to(folder).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        yield ".".join([package, *parts]), path


def imported(name: str, path: Path) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of everything `path` imports, relative imports resolved; for
    `from a.b import c` both `a.b` and `a.b.c` (c may be a module)."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield node.lineno, module
            for alias in node.names:
                yield node.lineno, f"{module}.{alias.name}"


def owner(module: str) -> str | None:
    """Which of our packages `module` belongs to ("fedpersona" for root modules), or None."""
    if module != "fedpersona" and not module.startswith("fedpersona."):
        return None
    for package in ("fedpersona.adapters", "fedpersona.trainer", "fedpersona.service"):
        if module == package or module.startswith(package + "."):
            return package
    return "fedpersona"


def allowed(importer: str, module: str) -> bool:
    target = owner(module)
    if target is None or target == importer or importer == "fedpersona":
        return True
    if target == "fedpersona.adapters":
        return True  # everyone may use the contract (its own imports were handled above)
    if importer == "fedpersona.service" and target == "fedpersona.trainer":
        # The interface module and the names it exports; the packages above it only as the
        # path to it (`from fedpersona.trainer.rounds import interface`).
        above = ("fedpersona.trainer", "fedpersona.trainer.rounds")
        return module == INTERFACE or module.startswith(INTERFACE + ".") or module in above
    return False


def violations(package: str) -> list[str]:
    return [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for name, path in modules(package)
        for line, module in imported(name, path)
        if not allowed(package, module)
    ]


@pytest.mark.parametrize(
    "package", ["fedpersona.adapters", "fedpersona.trainer", "fedpersona.service"]
)
def test_import_rules(package: str) -> None:
    assert violations(package) == []


def test_the_scan_sees_every_package_and_catches_a_violation(tmp_path: Path) -> None:
    counts = {package: len(list(modules(package))) for package in FOLDERS}
    assert all(count > 0 for count in counts.values()), counts
    # The service really does use the interface (and the scan resolves relative imports).
    service_imports = {
        m for name, path in modules("fedpersona.service") for _, m in imported(name, path)
    }
    assert any(m.startswith(INTERFACE) for m in service_imports)
    assert not allowed("fedpersona.service", "fedpersona.trainer.rounds.records")
    assert not allowed("fedpersona.service", "fedpersona.trainer.rounds.controller.X")
    assert not allowed("fedpersona.trainer", "fedpersona.service.settings")
    assert not allowed("fedpersona.adapters", "fedpersona.trainer.errors")
    assert not allowed("fedpersona.trainer", "fedpersona.cli")
    assert allowed("fedpersona", "fedpersona.service.http.app")
    bad = tmp_path / "bad.py"
    bad.write_text("from ..rounds import controller\n")
    resolved = {m for _, m in imported("fedpersona.service.http.routes.bad", bad)}
    assert resolved == {
        "fedpersona.service.http.rounds",
        "fedpersona.service.http.rounds.controller",
    }


def test_the_interface_imports_neither_torch_nor_flower() -> None:
    """The gateway reads round records without the training stack."""
    code = (
        "import sys, fedpersona.trainer.rounds.interface, fedpersona.service.http.routes.rounds\n"
        "heavy = sorted(m for m in ('torch', 'flwr', 'transformers', 'peft') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]"


def test_pyproject_lists_exactly_the_package_folders() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dir = config["package-dir"]
    assert {k: REPO / v for k, v in package_dir.items()} == FOLDERS
    on_disk = set()
    for root, folder in FOLDERS.items():
        for init in folder.rglob("__init__.py"):
            if any(part.startswith((".", "__pycache__")) for part in init.parts):
                continue
            rel = init.parent.relative_to(folder).parts
            on_disk.add(".".join([root, *rel]))
    assert sorted(config["packages"]) == sorted(on_disk)
    # And no folder of Python modules was left without an __init__.py (it would be left out).
    for root, folder in FOLDERS.items():
        for module in folder.rglob("*.py"):
            rel = module.parent.relative_to(folder).parts
            assert ".".join([root, *rel]) in on_disk, f"{module.parent} has no __init__.py"
