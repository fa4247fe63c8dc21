"""Render the fedpersona chart with the real `helm` binary and pick objects out of the output.

Test helpers only: no assertions live here. `render` raises `HelmFailed` (with helm's stderr)
when helm refuses the values, so tests can assert on the reason.
"""

from __future__ import annotations

import functools
import json
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "fedpersona"
EXAMPLES = sorted((CHART / "examples").glob("values-*.yaml"))
INSTALLER = REPO / "scripts" / "install_helm.sh"
# Kubernetes version rendered for and validated against (kubernetes-validate bundles its schemas;
# helm 4.1 is built against the 1.35 client).
KUBE_VERSION = "1.35.0"
RELEASE = "fp"
NAMESPACE = "llm"


class HelmFailed(Exception):
    def __init__(self, args: list[str], stderr: str) -> None:
        super().__init__(f"helm {' '.join(args)} failed:\n{stderr}")
        self.stderr = stderr


def run_helm(helm: Path, args: list[str]) -> str:
    proc = subprocess.run(
        [str(helm), *args], capture_output=True, text=True, timeout=120, check=False
    )
    if proc.returncode != 0:
        raise HelmFailed(args, proc.stderr + proc.stdout)
    return proc.stdout


@dataclass(frozen=True)
class Rendered:
    """The objects of one `helm template` run."""

    text: str
    docs: list[dict[str, Any]]

    def kinds(self) -> list[str]:
        return [d["kind"] for d in self.docs]

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def find(self, kind: str, component: str) -> dict[str, Any] | None:
        found = [
            d
            for d in self.all(kind)
            if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component
        ]
        if len(found) > 1:
            raise LookupError(f"{len(found)} {kind} objects for component {component!r}")
        return found[0] if found else None

    def get(self, kind: str, component: str) -> dict[str, Any]:
        found = self.find(kind, component)
        if found is None:
            raise LookupError(f"no {kind} for component {component!r} in {self.kinds()}")
        return found

    def named(self, kind: str, name: str) -> dict[str, Any] | None:
        return next((d for d in self.all(kind) if d["metadata"]["name"] == name), None)

    def pod_spec(self, component: str, kind: str = "Deployment") -> dict[str, Any]:
        obj = self.get(kind, component)
        if kind == "CronJob":
            return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]  # type: ignore[no-any-return]
        return obj["spec"]["template"]["spec"]  # type: ignore[no-any-return]

    def container(
        self, component: str, kind: str = "Deployment", *, name: str | None = None
    ) -> dict[str, Any]:
        """The container named `name` (default: the one named after the component)."""
        wanted = name or {"round-schedule": "start-round"}.get(component, component)
        for container in self.pod_spec(component, kind)["containers"]:
            if container["name"] == wanted:
                return container  # type: ignore[no-any-return]
        raise LookupError(f"{component} has no container {wanted!r}")


def render(
    helm: Path,
    *,
    files: Iterable[Path] = (),
    values: Mapping[str, Any] | None = None,
) -> Rendered:
    """`helm template` the chart with value files, then `values` on top (as a -f file).

    Identical renders within a session are served from a cache (the chart does not change
    during a test run); every call gets freshly parsed objects.
    """
    key = json.dumps(values or {}, sort_keys=True)
    text = _template(helm, tuple(str(f) for f in files), key)
    return Rendered(text=text, docs=[d for d in yaml.safe_load_all(text) if d])


@functools.lru_cache(maxsize=256)
def _template(helm: Path, files: tuple[str, ...], values_json: str) -> str:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    args += ["--kube-version", KUBE_VERSION]
    for f in files:
        args += ["-f", f]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=True) as extra:
        extra.write(values_json)  # JSON is YAML; keeps types exact
        extra.flush()
        args += ["-f", extra.name]
        return run_helm(helm, args)


def env_map(container: Mapping[str, Any]) -> dict[str, Any]:
    """A container's env as name -> value (plain) or name -> valueFrom (dict)."""
    out: dict[str, Any] = {}
    for item in container.get("env", []):
        out[item["name"]] = item["value"] if "value" in item else item["valueFrom"]
    return out


def labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())
