"""Every object the chart renders (defaults, each example, each optional feature switched on)
is valid for a recent Kubernetes, checked offline against its bundled JSON schemas."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from helmchart import EXAMPLES, KUBE_VERSION, Rendered, render

pytestmark = pytest.mark.helm

# Kinds that come from CRDs, not Kubernetes itself: no bundled schema, checked structurally below.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}

# Everything optional at once, so objects the examples leave off are validated too.
ALL_ON: dict[str, Any] = {
    "registryCredentials": {
        "create": True,
        "server": "registry.example.com",
        "username": "bot",
        "password": "s3cret",
    },
    "model": {"init": {"enabled": True, "copyFrom": "/model"}, "existingClaim": "weights"},
    "proxyTuning": {"enabled": True},
    "gateway": {
        "ingress": {"enabled": True, "tls": [{"hosts": ["a.example"], "secretName": "tls"}]},
        "autoscaling": {"enabled": True},
    },
    "vllm": {"gpus": 2},
    "trainer": {
        "gpus": 1,
        "superlink": {
            "service": {"type": "LoadBalancer", "loadBalancerSourceRanges": ["10.0.0.0/8"]},
            "tls": {"hosts": ["fl.example.com", "203.0.113.7"]},
            "auth": {"nodeBindings": [{"nodeId": "18446744073709551557", "users": ["alice"]}]},
        },
    },
    "roundSchedule": {"enabled": True, "timeZone": "Etc/UTC"},
    "networkPolicy": {
        "vllmMetricsFrom": [{"namespaceSelector": {}}],
        "fleetFrom": [{"ipBlock": {"cidr": "0.0.0.0/0"}}],
    },
    "serviceMonitor": {"enabled": True},
}

CASES: list[tuple[str, list[Path], dict[str, Any] | None]] = [
    ("defaults", [], None),
    *[(f.stem, [f], None) for f in EXAMPLES],
    ("all-features", [], ALL_ON),
    ("replicated", [], {"vllm": {"replicas": 3}, "gateway": {"replicas": 3}}),
    ("insecure-superlink", [], {"trainer": {"superlink": {"dangerouslyInsecure": True}}}),
]


def validate_core(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def check_service_monitor(obj: dict[str, Any], rendered: Rendered) -> None:
    """A ServiceMonitor must select one of the chart's Services and scrape a port it names."""
    spec = obj["spec"]
    assert set(spec) <= {"selector", "namespaceSelector", "endpoints", "jobLabel"}
    selector = spec["selector"]["matchLabels"]
    services = [
        s
        for s in rendered.all("Service")
        if all(s["metadata"]["labels"].get(k) == v for k, v in selector.items())
    ]
    assert len(services) == 1, f"{obj['metadata']['name']} selects {len(services)} Services"
    port_names = {p["name"] for p in services[0]["spec"]["ports"]}
    for endpoint in spec["endpoints"]:
        assert endpoint["port"] in port_names
        assert endpoint["path"] == "/metrics"
        assert endpoint["interval"].endswith("s")


@pytest.mark.parametrize(("name", "files", "values"), CASES, ids=[c[0] for c in CASES])
def test_every_object_is_valid_kubernetes(
    helm_bin: Path, name: str, files: list[Path], values: dict[str, Any] | None
) -> None:
    rendered = render(helm_bin, files=files, values=values)
    assert rendered.docs, name
    checked_crds = 0
    for obj in rendered.docs:
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            check_service_monitor(obj, rendered)
            checked_crds += 1
            continue
        try:
            validate_core(obj)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']} at {where}: {e.message}")
    assert checked_crds == len(rendered.all("ServiceMonitor"))


def test_all_features_case_renders_every_kind(helm_bin: Path) -> None:
    kinds = set(render(helm_bin, values=ALL_ON).kinds())
    assert kinds == {
        "ServiceAccount",
        "Secret",
        "PersistentVolumeClaim",
        "Deployment",
        "StatefulSet",  # the bundled PostgreSQL (several gateways)
        "Service",
        "Ingress",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "CronJob",
        "NetworkPolicy",
        "ServiceMonitor",
        "Pod",  # the `helm test` hook
    }


def test_validator_is_strict_enough_to_catch_mistakes(helm_bin: Path) -> None:
    """The validation above can fail: a misspelled field and a wrong type are refused."""
    deployment = render(helm_bin).get("Deployment", "gateway")
    validate_core(deployment)

    misspelled = copy.deepcopy(deployment)
    misspelled["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_core(misspelled)

    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_core(wrong_type)
