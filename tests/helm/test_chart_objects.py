"""What the rendered objects say: vLLM flags follow the values, secrets stay out of the manifests
when they are managed elsewhere, probes, network isolation, storage, security and shutdown."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from helmchart import EXAMPLES, NAMESPACE, RELEASE, env_map, labels_match, render

pytestmark = pytest.mark.helm

PROD = next(f for f in EXAMPLES if "gpu-production" in f.name)
WORKLOADS = ("gateway", "vllm", "trainer")


def flag_values(args: list[str]) -> dict[str, str | None]:
    """`--flag value` / bare `--flag` pairs of an argv tail."""
    out: dict[str, str | None] = {}
    i = 0
    while i < len(args):
        flag = args[i]
        assert flag.startswith("--"), f"stray argument {flag!r} in {args}"
        if i + 1 < len(args) and not args[i + 1].startswith("--"):
            out[flag] = args[i + 1]
            i += 2
        else:
            out[flag] = None
            i += 1
    return out


# ---- vLLM ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "vllm",
    [
        {"maxLoras": 3, "maxCpuLoras": 7, "maxLoraRank": 64, "maxModelLen": 2048, "dtype": "half"},
        {"maxLoras": 1, "maxCpuLoras": 1, "maxLoraRank": 8, "maxModelLen": 128, "gpus": 0},
    ],
)
def test_vllm_flags_follow_values(helm_bin: Path, vllm: dict[str, Any]) -> None:
    values = {"vllm": vllm, "model": {"name": "base-x", "path": "models/base-x"}}
    container = render(helm_bin, values=values).container("vllm")
    assert container["command"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    flags = flag_values(container["args"])
    assert "--enable-lora" in flags and flags["--enable-lora"] is None
    assert flags["--max-loras"] == str(vllm["maxLoras"])
    assert flags["--max-cpu-loras"] == str(vllm["maxCpuLoras"])
    assert flags["--max-lora-rank"] == str(vllm["maxLoraRank"])
    assert flags["--max-model-len"] == str(vllm["maxModelLen"])
    assert flags["--dtype"] == vllm.get("dtype", "auto")
    assert flags["--model"] == "/data/models/base-x"
    assert flags["--served-model-name"] == "base-x"
    assert flags["--port"] == "8000"
    env = env_map(container)
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    # The resolver plugins would map client-chosen names to paths: the allow-list is empty.
    assert env["VLLM_PLUGINS"] == ""


def test_logits_processor_only_with_proxy_tuning(helm_bin: Path) -> None:
    off = flag_values(render(helm_bin).container("vllm")["args"])
    assert "--logits-processors" not in off
    on_render = render(helm_bin, values={"proxyTuning": {"enabled": True, "processor": "m.p:C"}})
    on = flag_values(on_render.container("vllm")["args"])
    assert on["--logits-processors"] == "m.p:C"
    env = env_map(on_render.container("vllm"))
    assert env["FEDPERSONA_PROXY_SMALL_MODEL"] == "/data/models/small"
    assert env["FEDPERSONA_STORE_DIR"] == "/data/store"
    assert env_map(on_render.container("gateway"))["FEDPERSONA_PROXY_TUNING"] == "true"


def test_gpu_request_and_tensor_parallelism(helm_bin: Path) -> None:
    one = render(helm_bin).container("vllm")
    assert one["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "--tensor-parallel-size" not in flag_values(one["args"])

    two = render(helm_bin, values={"vllm": {"gpus": 2}}).container("vllm")
    assert two["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert flag_values(two["args"])["--tensor-parallel-size"] == "2"

    cpu = render(helm_bin, values={"vllm": {"gpus": 0}}).container("vllm")
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {})
    assert "--gpu-memory-utilization" not in flag_values(cpu["args"])


def test_vllm_probes_shm_and_graceful_shutdown(helm_bin: Path) -> None:
    rendered = render(helm_bin, files=[PROD])
    pod = rendered.pod_spec("vllm")
    container = rendered.container("vllm")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    drain = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > drain
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]


def test_model_from_its_own_claim(helm_bin: Path) -> None:
    rendered = render(helm_bin, files=[PROD])
    pod = rendered.pod_spec("vllm")
    container = rendered.container("vllm")
    model_volume = next(v for v in pod["volumes"] if v["name"] == "model")
    assert model_volume["persistentVolumeClaim"]["claimName"] == "llm-weights"
    mount = next(m for m in container["volumeMounts"] if m["name"] == "model")
    assert mount == {"name": "model", "mountPath": "/models", "readOnly": True}
    assert flag_values(container["args"])["--model"] == "/models/Llama-3.1-8B-Instruct"


def test_model_init_container(helm_bin: Path) -> None:
    assert "initContainers" not in render(helm_bin).pod_spec("vllm")
    rendered = render(helm_bin, values={"model": {"init": {"enabled": True, "copyFrom": "/m"}}})
    (init,) = rendered.pod_spec("vllm")["initContainers"]
    env = env_map(init)
    assert env["MODEL_DIR"] == "/data/models/large" and env["COPY_FROM"] == "/m"
    # The init step writes the model: it mounts the home volume writable; vLLM only reads it.
    assert not any(m.get("readOnly") for m in init["volumeMounts"])
    home = next(m for m in rendered.container("vllm")["volumeMounts"] if m["name"] == "home")
    assert home["readOnly"] is True


# ---- secrets -------------------------------------------------------------------------------


def test_admin_key_generated_into_a_secret_by_default(helm_bin: Path) -> None:
    rendered = render(helm_bin)
    secret = rendered.named("Secret", f"{RELEASE}-fedpersona-admin")
    assert secret is not None
    key = base64.b64decode(secret["data"]["admin-key"]).decode()
    assert len(key) >= 24
    for component in WORKLOADS:
        if component == "vllm":
            continue  # vLLM never sees the admin key
        ref = env_map(rendered.container(component))["FEDPERSONA_ADMIN_KEY"]
        assert ref == {"secretKeyRef": {"name": f"{RELEASE}-fedpersona-admin", "key": "admin-key"}}
    assert "FEDPERSONA_ADMIN_KEY" not in env_map(rendered.container("vllm"))


def test_existing_secrets_are_referenced_never_inlined(helm_bin: Path) -> None:
    sentinel_key = "INLINE-ADMIN-KEY-SENTINEL-0123456789"
    sentinel_password = "INLINE-REGISTRY-PASSWORD-SENTINEL"
    values = {
        "auth": {"adminKey": sentinel_key, "existingSecret": "ops-admin", "existingSecretKey": "k"},
        "registryCredentials": {
            "existingSecret": "ops-registry",
            "create": True,
            "server": "r.example",
            "username": "u",
            "password": sentinel_password,
        },
        "roundSchedule": {"enabled": True},
        "vllm": {"apiKey": {"existingSecret": "ops-engine", "existingSecretKey": "e"}},
        "database": {"external": {"existingSecret": "ops-database"}},
        "trainer": {
            "superlink": {
                "tls": {"existingSecret": "ops-tls"},
                "auth": {"existingBindingsSecret": "ops-bindings"},
            }
        },
    }
    rendered = render(helm_bin, values=values)
    assert rendered.all("Secret") == []
    engine_ref = {"secretKeyRef": {"name": "ops-engine", "key": "e"}}
    assert env_map(rendered.container("vllm"))["VLLM_API_KEY"] == engine_ref
    assert env_map(rendered.container("gateway"))["FEDPERSONA_ENGINE__API_KEY"] == engine_ref
    assert sentinel_key not in rendered.text
    assert sentinel_password not in rendered.text
    for component, kind in [
        ("gateway", "Deployment"),
        ("trainer", "Deployment"),
        ("round-schedule", "CronJob"),
    ]:
        env = env_map(rendered.container(component, kind))
        assert env["FEDPERSONA_ADMIN_KEY"] == {"secretKeyRef": {"name": "ops-admin", "key": "k"}}
        assert rendered.pod_spec(component, kind)["imagePullSecrets"] == [{"name": "ops-registry"}]
    assert rendered.pod_spec("vllm")["imagePullSecrets"] == [{"name": "ops-registry"}]


def test_registry_secret_created_from_credentials(helm_bin: Path) -> None:
    values = {
        "registryCredentials": {
            "create": True,
            "server": "r.example",
            "username": "bot",
            "password": "pw",
        }
    }
    rendered = render(helm_bin, values=values)
    secret = rendered.named("Secret", f"{RELEASE}-fedpersona-registry")
    assert secret is not None and secret["type"] == "kubernetes.io/dockerconfigjson"
    config = json.loads(base64.b64decode(secret["data"][".dockerconfigjson"]))
    entry = config["auths"]["r.example"]
    assert base64.b64decode(entry["auth"]).decode() == "bot:pw"
    assert rendered.pod_spec("gateway")["imagePullSecrets"] == [
        {"name": f"{RELEASE}-fedpersona-registry"}
    ]


# ---- gateway -------------------------------------------------------------------------------


def test_gateway_probes_security_and_shutdown(helm_bin: Path) -> None:
    rendered = render(helm_bin)
    pod = rendered.pod_spec("gateway")
    container = rendered.container("gateway")
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    # A read-only root still needs a writable /tmp.
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert container["resources"]["requests"] and container["resources"]["limits"]

    env = env_map(container)
    drain = float(env["FEDPERSONA_SHUTDOWN_GRACE_S"])
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > drain + pre_stop


def test_gateway_scaling_objects(helm_bin: Path) -> None:
    default = render(helm_bin)
    assert default.find("HorizontalPodAutoscaler", "gateway") is None
    assert default.find("Ingress", "gateway") is None
    assert default.get("Deployment", "gateway")["spec"]["replicas"] == 2
    pdb = default.get("PodDisruptionBudget", "gateway")
    assert labels_match(
        pdb["spec"]["selector"]["matchLabels"],
        default.get("Deployment", "gateway")["spec"]["template"]["metadata"]["labels"],
    )

    prod = render(helm_bin, files=[PROD])
    hpa = prod.get("HorizontalPodAutoscaler", "gateway")
    assert (
        hpa["spec"]["scaleTargetRef"]["name"]
        == prod.get("Deployment", "gateway")["metadata"]["name"]
    )
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    # The HPA owns the replica count.
    assert "replicas" not in prod.get("Deployment", "gateway")["spec"]
    ingress = prod.get("Ingress", "gateway")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == prod.get("Service", "gateway")["metadata"]["name"]
    assert ingress["spec"]["tls"][0]["secretName"] == "llm-example-com-tls"


def test_gateway_reaches_the_engine(helm_bin: Path) -> None:
    rendered = render(helm_bin)
    service = rendered.get("Service", "vllm")
    url = f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    container = rendered.container("gateway")
    assert env_map(container)["FEDPERSONA_ENGINE__URL"] == url
    assert container["args"][container["args"].index("--engine-url") + 1] == url

    external = render(helm_bin, files=[e for e in EXAMPLES if "external" in e.name])
    assert external.find("Deployment", "vllm") is None
    assert external.find("Service", "vllm") is None
    assert (
        env_map(external.container("gateway"))["FEDPERSONA_ENGINE__URL"]
        == "http://vllm.inference.svc.cluster.local:8000"
    )


# ---- network -------------------------------------------------------------------------------


def _pod_labels(rendered: Any, component: str, kind: str = "Deployment") -> dict[str, str]:
    obj = rendered.get(kind, component)
    if kind == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]  # type: ignore[no-any-return]
    return obj["spec"]["template"]["metadata"]["labels"]  # type: ignore[no-any-return]


def test_only_the_gateway_reaches_vllm(helm_bin: Path) -> None:
    rendered = render(helm_bin, values={"roundSchedule": {"enabled": True}})
    policy = rendered.get("NetworkPolicy", "vllm")
    spec = policy["spec"]
    # The policy applies to the vLLM pods and to nothing else.
    assert labels_match(spec["podSelector"]["matchLabels"], _pod_labels(rendered, "vllm"))
    for other in ("gateway", "trainer"):
        assert not labels_match(spec["podSelector"]["matchLabels"], _pod_labels(rendered, other))
    assert spec["policyTypes"] == ["Ingress"]
    (rule,) = spec["ingress"]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}  # same namespace, no ipBlock, no namespaceSelector
    selector = peer["podSelector"]["matchLabels"]
    assert labels_match(selector, _pod_labels(rendered, "gateway"))
    assert not labels_match(selector, _pod_labels(rendered, "trainer"))
    assert not labels_match(selector, _pod_labels(rendered, "round-schedule", "CronJob"))
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]


def test_metrics_scrapers_are_opt_in(helm_bin: Path) -> None:
    rendered = render(helm_bin, files=[PROD])
    rules = rendered.get("NetworkPolicy", "vllm")["spec"]["ingress"]
    assert len(rules) == 2
    assert rules[1]["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }
    assert render(helm_bin, values={"networkPolicy": {"enabled": False}}).all("NetworkPolicy") == []


def test_trainer_api_is_private_and_fleet_api_is_open(helm_bin: Path) -> None:
    rendered = render(helm_bin)
    api_rule, fleet_rule = rendered.get("NetworkPolicy", "trainer")["spec"]["ingress"]
    assert {p["port"] for p in api_rule["ports"]} == {"api", "control"}
    allowed = [p["podSelector"]["matchLabels"] for p in api_rule["from"]]
    assert any(labels_match(s, _pod_labels(rendered, "gateway")) for s in allowed)
    assert not any(labels_match(s, _pod_labels(rendered, "vllm")) for s in allowed)
    assert fleet_rule == {"ports": [{"port": "fleet", "protocol": "TCP"}]}


# ---- storage -------------------------------------------------------------------------------


def _claims(rendered: Any, component: str) -> dict[str, str]:
    return {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in rendered.pod_spec(component)["volumes"]
        if "persistentVolumeClaim" in v
    }


def test_store_claim_created_and_mounted_everywhere(helm_bin: Path) -> None:
    rendered = render(helm_bin)
    (pvc,) = rendered.all("PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    for component in WORKLOADS:
        assert _claims(rendered, component)["home"] == pvc["metadata"]["name"], component
        mounts = {m["name"]: m["mountPath"] for m in rendered.container(component)["volumeMounts"]}
        assert mounts["home"] == "/data", component


def test_existing_claim_replaces_the_created_one(helm_bin: Path) -> None:
    rendered = render(helm_bin, values={"persistence": {"existingClaim": "shared-store"}})
    assert rendered.all("PersistentVolumeClaim") == []
    for component in WORKLOADS:
        assert _claims(rendered, component)["home"] == "shared-store", component


# ---- trainer and rounds --------------------------------------------------------------------


TLS_DIR = "/etc/fedpersona/tls"
BINDINGS_FILE = "/etc/fedpersona/node-bindings/node-bindings.json"


def _secret_files(secret: dict[str, Any]) -> dict[str, bytes]:
    data = {k: base64.b64decode(v) for k, v in secret.get("data", {}).items()}
    return data | {k: v.encode() for k, v in secret.get("stringData", {}).items()}


def _mounts(rendered: Any, name: str) -> dict[str, str]:
    container = rendered.container("trainer", name=name)
    return {m["name"]: m["mountPath"] for m in container["volumeMounts"]}


def test_trainer_runs_one_superlink_with_tls_and_supernode_auth_by_default(
    helm_bin: Path,
) -> None:
    rendered = render(helm_bin)
    deployment = rendered.get("Deployment", "trainer")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    superlink = rendered.container("trainer", name="superlink")
    assert superlink["command"] == ["flower-superlink"]
    flags = flag_values(superlink["args"])
    assert "--insecure" not in flags
    assert "--enable-supernode-auth" in flags
    assert flags["--ssl-ca-certfile"] == f"{TLS_DIR}/ca.crt"
    assert flags["--ssl-certfile"] == f"{TLS_DIR}/tls.crt"
    assert flags["--ssl-keyfile"] == f"{TLS_DIR}/tls.key"
    assert flags["--fleet-api-address"] == "0.0.0.0:9092"
    # The ServerApp's API stays on loopback inside the pod.
    assert flags["--serverappio-api-address"].startswith("127.0.0.1:")
    assert flags["--database"] == "/data/superlink.db"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert superlink[probe]["grpc"] == {"port": 9099}, probe
    service = rendered.named("Service", f"{RELEASE}-fedpersona-superlink")
    assert service is not None
    assert [p["name"] for p in service["spec"]["ports"]] == ["fleet"]
    assert service["spec"]["ports"][0]["targetPort"] in {p["name"] for p in superlink["ports"]}

    # The generated TLS Secret is mounted where the flags point, in both containers.
    volumes = {v["name"]: v for v in rendered.pod_spec("trainer")["volumes"]}
    tls_name = f"{RELEASE}-fedpersona-superlink-tls"
    assert volumes["superlink-tls"]["secret"]["secretName"] == tls_name
    assert _mounts(rendered, "superlink")["superlink-tls"] == TLS_DIR
    assert _mounts(rendered, "trainer")["superlink-tls"] == TLS_DIR
    tls = rendered.named("Secret", tls_name)
    assert tls is not None and tls["type"] == "kubernetes.io/tls"
    assert set(_secret_files(tls)) == {"ca.crt", "tls.crt", "tls.key"}
    # The trainer submits runs over TLS with the node bindings; the bindings are mounted
    # without subPath (an update reaches the next run) and start empty: nobody is bound.
    trainer = flag_values(rendered.container("trainer")["args"][1:])
    assert trainer["--engine"] == "deployment"
    assert trainer["--root-certificates"] == f"{TLS_DIR}/ca.crt"
    assert trainer["--node-bindings"] == BINDINGS_FILE
    assert "--insecure-superlink" not in trainer
    bindings_name = f"{RELEASE}-fedpersona-node-bindings"
    assert volumes["node-bindings"]["secret"]["secretName"] == bindings_name
    mount = next(
        m for m in rendered.container("trainer")["volumeMounts"] if m["name"] == "node-bindings"
    )
    assert "subPath" not in mount and f"{mount['mountPath']}/node-bindings.json" == BINDINGS_FILE
    secret = rendered.named("Secret", bindings_name)
    assert secret is not None
    assert json.loads(_secret_files(secret)["node-bindings.json"]) == {"version": 1, "nodes": []}
    assert "node-bindings" not in _mounts(rendered, "superlink")  # only the ServerApp's side


def test_generated_certificate_names_the_service_localhost_and_the_given_hosts(
    helm_bin: Path,
) -> None:
    from cryptography import x509

    rendered = render(
        helm_bin,
        values={"trainer": {"superlink": {"tls": {"hosts": ["fl.example.com", "203.0.113.7"]}}}},
    )
    files = _secret_files(rendered.named("Secret", f"{RELEASE}-fedpersona-superlink-tls") or {})
    ca = x509.load_pem_x509_certificate(files["ca.crt"])
    cert = x509.load_pem_x509_certificate(files["tls.crt"])
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    service = f"{RELEASE}-fedpersona-superlink"
    assert set(names.get_values_for_type(x509.DNSName)) >= {
        "localhost",
        service,
        f"{service}.{NAMESPACE}.svc",
        "fl.example.com",
    }
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {
        "127.0.0.1",
        "203.0.113.7",
    }


def test_node_bindings_from_values_are_what_the_server_app_reads(
    helm_bin: Path, tmp_path: Path
) -> None:
    """The rendered bindings file is read by the real `NodeBindings.load`; 64-bit ids exact."""
    from fedpersona.trainer.flower.identity import NodeBindings

    big = "18446744073709551557"  # above 2**63, past float precision
    nodes = [
        {"nodeId": big, "users": ["alice", "bob"], "name": "family-tablet"},
        {"nodeId": "7", "users": ["carol"], "publicKeySha256": "ab" * 32},
    ]
    rendered = render(
        helm_bin, values={"trainer": {"superlink": {"auth": {"nodeBindings": nodes}}}}
    )
    secret = rendered.named("Secret", f"{RELEASE}-fedpersona-node-bindings")
    assert secret is not None
    path = tmp_path / "node-bindings.json"
    path.write_bytes(_secret_files(secret)["node-bindings.json"])
    bindings = NodeBindings.load(path)
    assert bindings.as_mapping() == {int(big): {"alice", "bob"}, 7: {"carol"}}
    assert [b.name for b in bindings] == ["", "family-tablet"]
    assert next(iter(bindings)).public_key_sha256 == "ab" * 32


def test_user_managed_tls_and_bindings_secrets_replace_the_generated_ones(
    helm_bin: Path,
) -> None:
    rendered = render(helm_bin, files=[PROD])
    assert rendered.named("Secret", f"{RELEASE}-fedpersona-superlink-tls") is None
    assert rendered.named("Secret", f"{RELEASE}-fedpersona-node-bindings") is None
    volumes = {v["name"]: v for v in rendered.pod_spec("trainer")["volumes"]}
    assert volumes["superlink-tls"]["secret"]["secretName"] == "fedpersona-superlink-tls"
    assert volumes["node-bindings"]["secret"]["secretName"] == "fedpersona-node-bindings"
    flags = flag_values(rendered.container("trainer", name="superlink")["args"])
    assert "--enable-supernode-auth" in flags and "--insecure" not in flags
    service = rendered.named("Service", f"{RELEASE}-fedpersona-superlink")
    assert service is not None and service["spec"]["type"] == "LoadBalancer"


def test_insecure_superlink_only_when_explicitly_chosen(helm_bin: Path) -> None:
    rendered = render(helm_bin, values={"trainer": {"superlink": {"dangerouslyInsecure": True}}})
    flags = flag_values(rendered.container("trainer", name="superlink")["args"])
    assert "--insecure" in flags
    assert not {"--enable-supernode-auth", "--ssl-certfile", "--ssl-keyfile"} & set(flags)
    trainer = flag_values(rendered.container("trainer")["args"][1:])
    assert "--insecure-superlink" in trainer
    assert "--root-certificates" not in trainer and "--node-bindings" not in trainer
    volumes = {v["name"] for v in rendered.pod_spec("trainer")["volumes"]}
    assert not {"superlink-tls", "node-bindings"} & volumes
    secrets = [s["metadata"]["name"] for s in rendered.all("Secret")]
    assert not [n for n in secrets if "superlink" in n or "bindings" in n], secrets


def test_round_schedule_only_when_enabled(helm_bin: Path) -> None:
    assert render(helm_bin).all("CronJob") == []
    rendered = render(helm_bin, files=[PROD])
    cron = rendered.get("CronJob", "round-schedule")
    assert cron["spec"]["schedule"] == "0 2 * * *"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    env = env_map(rendered.container("round-schedule", "CronJob"))
    assert json.loads(env["ROUND_SPEC"]) == {"algorithm": "pftt", "rounds": 3}
    trainer = rendered.named("Service", f"{RELEASE}-fedpersona-trainer")
    assert trainer is not None
    port = next(p["port"] for p in trainer["spec"]["ports"] if p["name"] == "api")
    assert env["ROUNDS_URL"] == f"http://{trainer['metadata']['name']}:{port}/admin/rounds"


# ---- monitoring ----------------------------------------------------------------------------


def test_service_monitor_only_when_enabled(helm_bin: Path) -> None:
    assert render(helm_bin).all("ServiceMonitor") == []
    monitors = render(helm_bin, values={"serviceMonitor": {"enabled": True}}).all("ServiceMonitor")
    assert sorted(m["metadata"]["labels"]["app.kubernetes.io/component"] for m in monitors) == [
        "gateway",
        "vllm",
    ]
    for monitor in monitors:
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}


def _all_containers(rendered: Any) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, pod spec, container) for every container and init container of every workload."""
    found = []
    for obj in rendered.docs:
        if obj["kind"] in {"Deployment"}:
            pod = obj["spec"]["template"]["spec"]
        elif obj["kind"] == "CronJob":
            pod = obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        elif obj["kind"] == "Pod":
            pod = obj["spec"]
        else:
            continue
        for container in pod.get("initContainers", []) + pod["containers"]:
            found.append((f"{obj['metadata']['name']}/{container['name']}", pod, container))
    return found


def test_every_container_is_non_root_with_a_writable_home(helm_bin: Path) -> None:
    values = {
        "roundSchedule": {"enabled": True},
        "model": {"init": {"enabled": True, "copyFrom": "/m"}},
    }
    rendered = render(helm_bin, values=values)
    containers = _all_containers(rendered)
    assert len(containers) == 7  # gateway, vllm + init, trainer + superlink, rounds, helm test
    for where, pod, container in containers:
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, where
        assert sc["capabilities"]["drop"] == ["ALL"], where
        if not sc.get("readOnlyRootFilesystem"):
            assert where.endswith("-vllm/vllm"), f"{where} has a writable root filesystem"
            continue
        home = env_map(container).get("HOME")
        mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
        if container["command"][0] in {"fedpersona", "flower-superlink"}:
            # Flower, torch and Hugging Face write config and caches under $HOME.
            assert home is not None, f"{where} runs {container['command'][0]} without HOME"
        if home is not None:
            assert any(home == m or home.startswith(m + "/") for m in mounts), where


def test_engine_key_is_a_generated_secret_and_the_ingress_serves_only_the_api(
    helm_bin: Path,
) -> None:
    rendered = render(helm_bin, values={"gateway": {"ingress": {"enabled": True}}})
    secret = rendered.named("Secret", f"{RELEASE}-fedpersona-engine")
    assert secret is not None and len(secret["data"]["engine-key"]) >= 48
    ref = {"secretKeyRef": {"name": f"{RELEASE}-fedpersona-engine", "key": "engine-key"}}
    vllm = rendered.container("vllm")
    assert env_map(vllm)["VLLM_API_KEY"] == ref
    assert env_map(rendered.container("gateway"))["FEDPERSONA_ENGINE__API_KEY"] == ref
    args = vllm["args"]
    assert args[args.index("--middleware") + 1] == "fedpersona.service.engine.guard.EngineKeyGuard"
    assert "--api-key" not in args  # never on a command line
    ingress = rendered.all("Ingress")[0]
    paths = [p["path"] for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    assert paths == ["/v1"]  # not /metrics, /docs, /admin or the probes
    assert env_map(rendered.container("gateway"))["FEDPERSONA_DOCS"] == "false"


def test_several_vllm_replicas_run_as_a_statefulset_the_gateways_discover(
    helm_bin: Path,
) -> None:
    rendered = render(helm_bin, values={"vllm": {"replicas": 3}, "gateway": {"replicas": 3}})
    assert rendered.find("Deployment", "vllm") is None
    stateful = rendered.get("StatefulSet", "vllm")
    headless = rendered.get("Service", "vllm-replicas")
    assert stateful["spec"]["replicas"] == 3
    assert stateful["spec"]["serviceName"] == headless["metadata"]["name"]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == stateful["spec"]["selector"]["matchLabels"]
    env = env_map(rendered.container("gateway"))
    port = headless["spec"]["ports"][0]["port"]
    assert env["FEDPERSONA_REPLICAS_DNS"] == (
        f"{headless['metadata']['name']}.{NAMESPACE}.svc.cluster.local:{port}"
    )
    # One replica: a Deployment, no headless Service, no replica routing.
    single = render(helm_bin)
    assert single.find("StatefulSet", "vllm") is None
    assert single.find("Service", "vllm-replicas") is None
    assert "FEDPERSONA_REPLICAS_DNS" not in env_map(single.container("gateway"))
