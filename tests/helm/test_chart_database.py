"""The gateway's database in the chart: PostgreSQL (bundled, or an external URL from a Secret)
as soon as several gateways can run, SQLite for one; the URL reaches the gateways only through
a Secret, and what the chart sets is what `fedpersona.service.settings.Settings` reads."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
from fedpersona.service.settings import Settings
from helmchart import KUBE_VERSION, NAMESPACE, RELEASE, HelmFailed, Rendered, env_map, render

pytestmark = pytest.mark.helm

PG = f"{RELEASE}-fedpersona-postgresql"


def _valid(rendered: Rendered) -> None:
    for obj in rendered.docs:
        if obj["kind"] != "ServiceMonitor":
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def _database_url(rendered: Rendered) -> str:
    secret = rendered.named("Secret", PG)
    assert secret is not None
    return base64.b64decode(secret["data"]["database-url"]).decode()


def _uses_postgres(rendered: Rendered) -> bool:
    return "FEDPERSONA_DATABASE_URL" in env_map(rendered.container("gateway"))


def test_several_gateways_get_the_bundled_postgresql_by_default(helm_bin: Path) -> None:
    rendered = render(helm_bin)  # gateway.replicas: 2
    _valid(rendered)
    stateful = rendered.get("StatefulSet", "postgresql")
    service = rendered.get("Service", "postgresql")
    assert stateful["spec"]["replicas"] == 1 and stateful["spec"]["serviceName"] == PG
    assert service["metadata"]["name"] == PG

    url = urlsplit(_database_url(rendered))
    secret = rendered.named("Secret", PG)
    assert secret is not None
    password = base64.b64decode(secret["data"]["password"]).decode()
    assert len(password) >= 32 and password.isalnum()
    assert (url.scheme, url.username, url.password) == ("postgresql", "fedpersona", password)
    assert (url.hostname, url.port, url.path) == (f"{PG}.{NAMESPACE}.svc", 5432, "/fedpersona")
    assert password not in rendered.text.replace(secret["data"]["password"], "")

    env = env_map(rendered.container("gateway"))
    assert env["FEDPERSONA_DATABASE_URL"] == {"secretKeyRef": {"name": PG, "key": "database-url"}}
    assert env["FEDPERSONA_RATE_LIMIT_SCOPE"] == "auto"  # = shared buckets on PostgreSQL
    pod = stateful["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert env_map(container)["POSTGRES_PASSWORD"] == {
        "secretKeyRef": {"name": PG, "key": "password"}
    }
    assert env_map(container)["PGDATA"].startswith("/var/lib/postgresql/data/")
    # Non-root, read-only root filesystem, writable socket and temp dirs, probes.
    assert pod["securityContext"]["runAsNonRoot"] is True
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/var/lib/postgresql/data", "/var/run/postgresql", "/tmp"} <= mounts
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"][0] == "pg_isready"
    (claim,) = stateful["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "8Gi"


def test_only_gateways_reach_the_database(helm_bin: Path) -> None:
    rendered = render(helm_bin)
    policy = rendered.named("NetworkPolicy", PG)
    assert policy is not None
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]
    assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"
    assert rule["ports"] == [{"port": "postgresql", "protocol": "TCP"}]
    off = render(helm_bin, values={"networkPolicy": {"enabled": False}})
    assert off.named("NetworkPolicy", PG) is None


@pytest.mark.parametrize(
    ("values", "postgres"),
    [
        ({"gateway": {"replicas": 1}}, False),
        ({"gateway": {"replicas": 1, "autoscaling": {"enabled": True}}}, True),
        ({"gateway": {"replicas": 3}, "vllm": {"replicas": 3}}, True),
        ({"gateway": {"replicas": 3}, "database": {"type": "sqlite"}}, False),
        ({"gateway": {"replicas": 1}, "database": {"type": "postgresql"}}, True),
    ],
)
def test_database_type_follows_the_number_of_gateways(
    helm_bin: Path, values: dict[str, Any], postgres: bool
) -> None:
    rendered = render(helm_bin, values=values)
    _valid(rendered)
    assert _uses_postgres(rendered) == postgres
    assert (rendered.find("StatefulSet", "postgresql") is not None) == postgres
    assert (rendered.named("Secret", PG) is not None) == postgres


def test_external_postgresql_from_a_secret(helm_bin: Path) -> None:
    values = {
        "gateway": {"replicas": 3},
        "database": {
            "external": {"existingSecret": "ops-database", "existingSecretKey": "url"},
            "poolSize": 4,
        },
    }
    rendered = render(helm_bin, values=values)
    _valid(rendered)
    assert rendered.find("StatefulSet", "postgresql") is None
    assert rendered.named("Secret", PG) is None and rendered.named("NetworkPolicy", PG) is None
    env = env_map(rendered.container("gateway"))
    assert env["FEDPERSONA_DATABASE_URL"] == {
        "secretKeyRef": {"name": "ops-database", "key": "url"}
    }
    assert env["FEDPERSONA_DATABASE_POOL_SIZE"] == "4"


def test_what_the_chart_sets_is_what_the_gateway_reads(helm_bin: Path, tmp_path: Path) -> None:
    rendered = render(helm_bin, values={"gateway": {"rateLimit": {"scope": "database"}}})
    env = env_map(rendered.container("gateway"))
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        home=tmp_path,
        database_url=_database_url(rendered),
        database_pool_size=env["FEDPERSONA_DATABASE_POOL_SIZE"],
        rate_limit_scope=env["FEDPERSONA_RATE_LIMIT_SCOPE"],
    )
    assert settings.registry_location == _database_url(rendered)
    assert settings.rate_limit_scope == "database" and settings.database_pool_size == 10
    for name in env:
        if name.startswith(("FEDPERSONA_DATABASE", "FEDPERSONA_RATE_LIMIT")):
            assert name.removeprefix("FEDPERSONA_").lower() in Settings.model_fields, name


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"database": {"type": "mysql"}}, "/database/type"),
        ({"database": {"poolSize": 0}}, "/database/poolSize"),
        ({"database": {"bundled": {"passwd": "x"}}}, "passwd"),
        ({"database": {"bundled": {"username": "Robert'); DROP"}}}, "/database/bundled/username"),
        ({"gateway": {"rateLimit": {"scope": "cluster"}}}, "/gateway/rateLimit/scope"),
        ({"gateway": {"replicas": 30}}, "exceed database.bundled.maxConnections"),
        (
            {"database": {"type": "sqlite", "external": {"existingSecret": "ops-database"}}},
            "database.type is sqlite",
        ),
    ],
)
def test_bad_database_values_are_refused(
    helm_bin: Path, values: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(HelmFailed) as err:
        render(helm_bin, values=values)
    assert complaint in err.value.stderr
