"""The trainer pod's SuperLink container, run here as a plain process: the real
`flower-superlink` with exactly the arguments the chart renders (ports and paths moved to free
ones) starts, reports SERVING on its gRPC health service (the probes' target), stores its state
where the chart says, and by default serves the Fleet and Control APIs over TLS with SuperNode
authentication, with the certificate the chart generated (or the user's Secret), trusted through
its ca.crt under the name the trainer container dials (localhost). Plain gRPC only when
`dangerouslyInsecure` is set."""

from __future__ import annotations

import base64
import datetime
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helmchart import render

pytestmark = [pytest.mark.helm, pytest.mark.flower, pytest.mark.slow]

BIN = Path(sys.executable).parent
TLS_DIR = "/etc/fedpersona/tls"


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def superlink_pod(helm_bin: Path, home: Path, **superlink: Any) -> Any:
    fleet, control, appio, health = free_ports(4)
    values = {
        "persistence": {"mountPath": str(home)},
        "trainer": {
            "superlink": {
                "fleetPort": fleet,
                "controlPort": control,
                "serverAppIoPort": appio,
                "healthPort": health,
                **superlink,
            }
        },
    }
    return render(helm_bin, values=values)


def superlink_container(helm_bin: Path, home: Path, **superlink: Any) -> dict[str, Any]:
    return superlink_pod(helm_bin, home, **superlink).container("trainer", name="superlink")


@contextmanager
def running(argv: list[str], cwd: Path) -> Iterator[subprocess.Popen[str]]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HOME": str(cwd)}
    env = {k: v for k, v in env.items() if not k.startswith("FEDPERSONA_")}
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_serving(port: int, proc: subprocess.Popen[str], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                out = proc.stdout.read() if proc.stdout else ""
                pytest.fail(f"flower-superlink exited with {proc.returncode}:\n{out}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    pytest.fail("flower-superlink never reported SERVING")


def _port(container: dict[str, Any], name: str) -> int:
    return next(int(p["containerPort"]) for p in container["ports"] if p["name"] == name)


def _tls_handshake(port: int, ca: Path, host: str = "localhost") -> str:
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        return str(tls.version())


def test_superlink_container_starts_with_the_chart_arguments(
    helm_bin: Path, tmp_path: Path
) -> None:
    """Defaults: the chart's generated certificate, TLS on both APIs, SuperNode auth on."""
    rendered = superlink_pod(helm_bin, tmp_path)
    container = rendered.container("trainer", name="superlink")
    assert "--enable-supernode-auth" in container["args"]
    assert "--insecure" not in container["args"]
    secret = rendered.named("Secret", "fp-fedpersona-superlink-tls")
    assert secret is not None
    certs = tmp_path / "tls"
    certs.mkdir()
    for name, value in secret["data"].items():
        (certs / name).write_bytes(base64.b64decode(value))
    args = [a.replace(TLS_DIR, str(certs)) for a in container["args"]]
    health = container["livenessProbe"]["grpc"]["port"]
    with running([str(BIN / container["command"][0]), *args], tmp_path) as proc:
        wait_serving(health, proc)
        for api in ("fleet", "control"):
            assert _tls_handshake(_port(container, api), certs / "ca.crt") in {
                "TLSv1.2",
                "TLSv1.3",
            }, api
    assert (tmp_path / "superlink.db").is_file()


def test_operator_registers_a_node_through_the_charts_control_api(
    helm_bin: Path, tmp_path: Path
) -> None:
    """docs/deploy.md 8.1: `fedpersona nodes register` against the chart's SuperLink at
    localhost with the generated ca.crt; the node id it records, listed in values, renders into
    the bindings Secret the trainer reads."""
    from fedpersona.trainer.flower.deployment import register_node
    from fedpersona.trainer.flower.identity import NodeBindings, generate_node_key

    rendered = superlink_pod(helm_bin, tmp_path)
    container = rendered.container("trainer", name="superlink")
    secret = rendered.named("Secret", "fp-fedpersona-superlink-tls")
    assert secret is not None
    certs = tmp_path / "tls"
    certs.mkdir()
    for name, value in secret["data"].items():
        (certs / name).write_bytes(base64.b64decode(value))
    args = [a.replace(TLS_DIR, str(certs)) for a in container["args"]]
    key = generate_node_key(tmp_path / "keys", "alice-phone")
    bindings = tmp_path / "node-bindings.json"
    with running([str(BIN / container["command"][0]), *args], tmp_path) as proc:
        wait_serving(container["livenessProbe"]["grpc"]["port"], proc)
        binding = register_node(
            key.public,
            control=f"localhost:{_port(container, 'control')}",
            flwr_home=tmp_path / "ops" / ".flwr",
            root_certificates=certs / "ca.crt",
            users=("alice",),
            bindings_file=bindings,
        )
    assert NodeBindings.load(bindings).users_of(binding.node_id) == {"alice"}
    listed = {"nodeId": str(binding.node_id), "users": ["alice"]}
    again = render(
        helm_bin, values={"trainer": {"superlink": {"auth": {"nodeBindings": [listed]}}}}
    )
    rendered_bindings = again.named("Secret", "fp-fedpersona-node-bindings")
    assert rendered_bindings is not None
    (tmp_path / "rendered.json").write_text(rendered_bindings["stringData"]["node-bindings.json"])
    assert NodeBindings.load(tmp_path / "rendered.json").as_mapping() == {
        binding.node_id: {"alice"}
    }


def test_insecure_superlink_container_serves_plain_grpc(helm_bin: Path, tmp_path: Path) -> None:
    container = superlink_container(helm_bin, tmp_path, dangerouslyInsecure=True)
    assert "--insecure" in container["args"]
    health = container["livenessProbe"]["grpc"]["port"]
    with running([str(BIN / container["command"][0]), *container["args"]], tmp_path) as proc:
        wait_serving(health, proc)
        with socket.create_connection(("127.0.0.1", _port(container, "fleet")), timeout=5):
            pass


def _self_signed(directory: Path) -> None:
    """ca.crt, and tls.crt/tls.key for `localhost` signed by it (what the Secret holds)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("test-ca"))
        .issuer_name(name("test-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (directory / "ca.crt").write_bytes(ca.public_bytes(pem))
    (directory / "tls.crt").write_bytes(cert.public_bytes(pem))
    (directory / "tls.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def test_superlink_container_serves_tls_with_the_secret_files(
    helm_bin: Path, tmp_path: Path
) -> None:
    certs = tmp_path / "tls"
    certs.mkdir()
    _self_signed(certs)
    container = superlink_container(helm_bin, tmp_path, tls={"existingSecret": "superlink-tls"})
    mount = next(m for m in container["volumeMounts"] if m["name"] == "superlink-tls")
    assert mount["mountPath"] == TLS_DIR
    # The Secret's files, where the pod would mount them.
    args = [a.replace(TLS_DIR, str(certs)) for a in container["args"]]
    assert "--insecure" not in args
    health = container["livenessProbe"]["grpc"]["port"]
    with running([str(BIN / container["command"][0]), *args], tmp_path) as proc:
        wait_serving(health, proc)
        context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        context.set_alpn_protocols(["h2"])
        fleet = _port(container, "fleet")
        with (
            socket.create_connection(("127.0.0.1", fleet), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            assert tls.version() in {"TLSv1.2", "TLSv1.3"}
