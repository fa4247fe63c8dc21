"""Fixtures for the chart tests: the pinned helm binary, installed once per session."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from helmchart import INSTALLER


@pytest.fixture(scope="session")
def helm_bin() -> Path:
    """`<repo>/tools/bin/helm`, installed by scripts/install_helm.sh (quick when present).

    A missing helm fails the tests rather than skipping them: they are the chart's only check.
    """
    proc = subprocess.run(
        ["bash", str(INSTALLER)], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, f"scripts/install_helm.sh failed:\n{proc.stderr}"
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert path.is_file(), path
    return path
