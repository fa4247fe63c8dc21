"""The pinned helm installs offline-capably, lints the chart strictly, and the chart's
values.schema.json refuses bad values before anything renders."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from helmchart import CHART, EXAMPLES, INSTALLER, HelmFailed, render, run_helm

pytestmark = pytest.mark.helm

VALUE_FILES = [None, *EXAMPLES]
_BOUND = {"nodeBindings": [{"nodeId": "12", "users": ["alice"]}]}


def _bindings(binding: dict[str, Any]) -> dict[str, Any]:
    return {"trainer": {"superlink": {"auth": {"nodeBindings": [binding]}}}}


def _ids(f: Path | None) -> str:
    return "defaults" if f is None else f.stem


def test_installer_is_idempotent_and_pins_the_version(helm_bin: Path) -> None:
    start = time.monotonic()
    proc = subprocess.run(
        ["bash", str(INSTALLER)], capture_output=True, text=True, timeout=60, check=True
    )
    assert time.monotonic() - start < 10, "a second install should reuse the binary"
    assert Path(proc.stdout.strip()) == helm_bin
    assert run_helm(helm_bin, ["version", "--template", "{{.Version}}"]) == "v4.1.4"


@pytest.mark.slow
def test_installer_replaces_a_wrong_helm_using_the_python_unzip_fallback(tmp_path: Path) -> None:
    stale = tmp_path / "helm"
    stale.write_text("#!/bin/sh\necho v0.0.1\n")
    stale.chmod(0o755)
    env = {**os.environ, "HELM_INSTALL_DIR": str(tmp_path), "HELM_UNZIP": "python"}
    proc = subprocess.run(
        ["bash", str(INSTALLER)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == stale
    assert run_helm(stale, ["version", "--template", "{{.Version}}"]) == "v4.1.4"
    assert [p.name for p in tmp_path.iterdir()] == ["helm"]  # no temporary files left


@pytest.mark.parametrize("values_file", VALUE_FILES, ids=_ids)
def test_lint_strict(helm_bin: Path, values_file: Path | None) -> None:
    args = ["lint", "--strict", str(CHART)]
    if values_file is not None:
        args += ["-f", str(values_file)]
    out = run_helm(helm_bin, args)
    assert "0 chart(s) failed" in out


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"gateway": {"replicas": -1}}, "/gateway/replicas"),
        ({"vllm": {"replicas": -2}}, "/vllm/replicas"),
        ({"gatway": {"replicas": 1}}, "gatway"),  # typo at the top level
        ({"vllm": {"maxLoraRanks": 16}}, "maxLoraRanks"),  # typo one level down
        ({"gateway": {"service": {"prot": 80}}}, "prot"),  # and deeper
        ({"vllm": {"maxLoraRank": 12}}, "/vllm/maxLoraRank"),  # vLLM has no rank 12
        ({"vllm": {"dtype": "fp8-ish"}}, "/vllm/dtype"),
        ({"vllm": {"gpuMemoryUtilization": 1.5}}, "/vllm/gpuMemoryUtilization"),
        ({"vllm": {"externalUrl": "vllm:8000"}}, "/vllm/externalUrl"),
        ({"gateway": {"port": 70000}}, "/gateway/port"),
        ({"persistence": {"accessModes": ["ReadWriteSometimes"]}}, "/persistence/accessModes"),
        ({"proxyTuning": {"processor": "no-colon"}}, "/proxyTuning/processor"),
        ({"gateway": {"environment": "staging"}}, "/gateway/environment"),
        # The old switch is gone: TLS is on unless dangerouslyInsecure says otherwise.
        ({"trainer": {"superlink": {"tls": {"enabled": False}}}}, "enabled"),
        ({"trainer": {"superlink": {"dangerouslyInsecure": "yes"}}}, "dangerouslyInsecure"),
        ({"trainer": {"engine": "ray"}}, "/trainer/engine"),
        # A 64-bit node id as a YAML number would lose digits: only a string is accepted.
        (_bindings({"nodeId": 9183602745510235417, "users": ["alice"]}), "nodeId"),
        (_bindings({"nodeId": "12", "users": ["Alice!"]}), "users"),
        (_bindings({"nodeId": "12", "users": []}), "users"),
        (_bindings({"nodeId": "0", "users": ["alice"]}), "nodeId"),
    ],
)
def test_schema_rejects_bad_values(helm_bin: Path, values: dict[str, Any], complaint: str) -> None:
    with pytest.raises(HelmFailed) as err:
        render(helm_bin, values=values)
    assert complaint in err.value.stderr


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"vllm": {"maxLoras": 8, "maxCpuLoras": 4}}, "maxCpuLoras must be >= vllm.maxLoras"),
        ({"vllm": {"extraArgs": ["--max-lora-rank=64"]}}, "may not set --max-lora-rank"),
        ({"vllm": {"drainSeconds": 60, "terminationGracePeriodSeconds": 60}}, "drainSeconds"),
        ({"gateway": {"shutdownGraceSeconds": 40}}, "gateway.terminationGracePeriodSeconds"),
        ({"vllm": {"enabled": False}}, "vllm.externalUrl is required"),
        ({"auth": {"adminKey": "too-short"}}, "at least 24 characters"),
        (
            {"trainer": {"superlink": {"dangerouslyInsecure": True, "tls": {"hosts": ["a.b"]}}}},
            "cannot be combined",
        ),
        (
            {"trainer": {"superlink": {"dangerouslyInsecure": True, "auth": _BOUND}}},
            "cannot be combined",
        ),
        ({"trainer": {"superlink": {"extraArgs": ["--insecure"]}}}, "may not set --insecure"),
        (
            {"trainer": {"superlink": {"extraArgs": ["--ssl-certfile=/x"]}}},
            "may not set --ssl-certfile",
        ),
        (
            {"trainer": {"superlink": {"auth": {**_BOUND, "existingBindingsSecret": "b"}}}},
            "not both",
        ),
        ({"model": {"init": {"enabled": True}}}, "copyFrom or model.init.command"),
        ({"gateway": {"podDisruptionBudget": {"minAvailable": 1}}}, "not both"),
        ({"registryCredentials": {"create": True}}, "registryCredentials.server is required"),
    ],
)
def test_render_refuses_inconsistent_values(
    helm_bin: Path, values: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(HelmFailed) as err:
        render(helm_bin, values=values)
    assert complaint in err.value.stderr
