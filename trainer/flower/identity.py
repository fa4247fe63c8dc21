"""SuperNode identities on the Deployment Engine, and the operator's binding of nodes to users.

A SuperNode proves who it is with an EC (P-384) key pair: the SuperLink runs with
`--enable-supernode-auth` (which needs TLS), the operator registers each node's public key on the
SuperLink (`flwr supernode register`, wrapped by `fedpersona nodes register`), and the SuperLink
then accepts only Fleet API calls signed by a registered key, each under the node id it assigned
to that key. That node id is what the ServerApp sees as a reply's `src_node_id`.

`NodeBindings` is the one place that says which users an authenticated node may train for: a JSON
file the operator writes (`fedpersona nodes register ... --users alice`), read by the ServerApp
through the run config's `node-bindings` key. A node's own node config (`user=...`) only says
which of its bound users it trains; it grants nothing.

This module generates keys and TLS files and reads/writes the bindings file; it starts no
process and knows nothing about rounds (`fedpersona.trainer.flower.admission` applies the
bindings to replies).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fedpersona.adapters import InvalidName, validate_user_id
from fedpersona.trainer.errors import ConfigError

BINDINGS_VERSION = 1


@dataclass(frozen=True)
class NodeKey:
    """A SuperNode's key files: `--auth-supernode-private-key` and the public key to register."""

    private: Path
    public: Path


def generate_node_key(directory: Path, name: str) -> NodeKey:
    """Write `<name>` (OpenSSH private key, mode 0600) and `<name>.pub` (OpenSSH public key)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = directory / name
    public = directory / f"{name}.pub"
    _write_secret(
        private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b"\n"
    )
    return NodeKey(private=private, public=public)


def public_key_fingerprint(public_key: Path) -> str:
    """sha256 of an OpenSSH public key file's key (what a binding records about its node)."""
    loaded = serialization.load_ssh_public_key(public_key.read_bytes())
    raw = loaded.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True)
class TlsFiles:
    """A SuperLink's `--ssl-ca-certfile`, `--ssl-certfile`, `--ssl-keyfile`."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def generate_tls(directory: Path, *, hosts: Iterable[str], days: int = 365) -> TlsFiles:
    """A private CA and a server certificate for `hosts` (DNS names or IP addresses), signed by it.

    For tests and single-operator deployments; a cluster may use cert-manager instead (the chart
    only needs a Secret with these three files).
    """
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedpersona superlink CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    if not names:
        raise ConfigError("a server certificate needs at least one host name or address")
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedpersona superlink")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(
        ca_cert=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
    )
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_secret(
        files.server_key,
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    return files


@dataclass(frozen=True)
class NodeBinding:
    """One registered SuperNode and the users it may train for."""

    node_id: int
    users: tuple[str, ...]
    name: str = ""
    public_key_sha256: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.node_id, bool) or not isinstance(self.node_id, int) or self.node_id < 1:
            raise ConfigError(f"node binding: node_id must be a positive integer: {self.node_id!r}")
        if not self.users:
            raise ConfigError(f"node binding {self.node_id}: names no user")
        for user in self.users:
            try:
                validate_user_id(user)
            except InvalidName as e:
                raise ConfigError(f"node binding {self.node_id}: {e}") from e


class NodeBindings:
    """Authenticated node id -> the users it may train for (a JSON file the operator owns)."""

    def __init__(self, bindings: Iterable[NodeBinding] = ()) -> None:
        self._by_node: dict[int, NodeBinding] = {}
        for binding in bindings:
            self.bind(binding)

    def bind(self, binding: NodeBinding) -> None:
        """Add or replace `binding`; a user is bound to one node at most."""
        for other in self._by_node.values():
            shared = set(other.users) & set(binding.users)
            if other.node_id != binding.node_id and shared:
                raise ConfigError(
                    f"user(s) {sorted(shared)} already bound to node {other.node_id}; "
                    "unbind them first"
                )
        self._by_node[binding.node_id] = binding

    def unbind(self, node_id: int) -> None:
        self._by_node.pop(node_id, None)

    def users_of(self, node_id: int) -> frozenset[str]:
        """The users `node_id` may train for (empty for an unknown node)."""
        binding = self._by_node.get(node_id)
        return frozenset(binding.users) if binding else frozenset()

    def as_mapping(self) -> Mapping[int, frozenset[str]]:
        return {node: frozenset(b.users) for node, b in self._by_node.items()}

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(sorted(self._by_node.values(), key=lambda b: b.node_id))

    def __len__(self) -> int:
        return len(self._by_node)

    # ---------------------------------------------------------------------------- file

    @classmethod
    def load(cls, path: Path) -> NodeBindings:
        """Read a bindings file strictly (unknown keys, bad ids or users are ConfigErrors)."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise ConfigError(f"node bindings file {path} does not exist") from e
        except json.JSONDecodeError as e:
            raise ConfigError(f"node bindings file {path}: not JSON: {e}") from e
        if not isinstance(data, dict) or data.get("version") != BINDINGS_VERSION:
            raise ConfigError(f"node bindings file {path}: expected version {BINDINGS_VERSION}")
        nodes = data.get("nodes")
        if not isinstance(nodes, list) or set(data) != {"version", "nodes"}:
            raise ConfigError(f"node bindings file {path}: expected keys version and nodes")
        bindings = cls()
        for entry in nodes:
            if not isinstance(entry, dict) or not set(entry) <= {
                "node_id",
                "users",
                "name",
                "public_key_sha256",
            }:
                raise ConfigError(f"node bindings file {path}: malformed entry {entry!r}")
            users = entry.get("users")
            if not isinstance(users, list) or not all(isinstance(u, str) for u in users):
                raise ConfigError(f"node bindings file {path}: users must be a list of names")
            bindings.bind(
                NodeBinding(
                    node_id=entry.get("node_id"),  # type: ignore[arg-type]
                    users=tuple(users),
                    name=str(entry.get("name", "")),
                    public_key_sha256=str(entry.get("public_key_sha256", "")),
                )
            )
        return bindings

    def save(self, path: Path) -> None:
        """Write atomically (temporary file, fsync, rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {
            "version": BINDINGS_VERSION,
            "nodes": [
                {
                    "node_id": b.node_id,
                    "users": list(b.users),
                    "name": b.name,
                    "public_key_sha256": b.public_key_sha256,
                }
                for b in self
            ],
        }
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(body, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def _write_secret(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
