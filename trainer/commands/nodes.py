"""`fedpersona nodes keygen`: a SuperNode's key pair (and, with `--tls-host`, SuperLink TLS files).

The private key stays on the device (`flower-supernode --auth-supernode-private-key`); the
operator registers the `.pub` file with `fedpersona nodes register`, which also binds the node to
its users. `--tls-host` additionally writes a private CA and a SuperLink server certificate for
those hosts (`ca.crt`, `server.crt`, `server.key`), for a deployment without cert-manager.
Key formats and files are `fedpersona.trainer.flower.identity`'s.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedpersona.trainer.flower.identity import (
    generate_node_key,
    generate_tls,
    public_key_fingerprint,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="folder to write the keys into")
    parser.add_argument("--name", default="supernode", help="key file name (default: supernode)")
    parser.add_argument(
        "--tls-host",
        action="append",
        default=[],
        metavar="HOST",
        help="also write a CA and a SuperLink certificate for HOST (repeatable)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite existing key files")


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    if (out / args.name).exists() and not args.force:
        raise SystemExit(f"{out / args.name} exists; pass --force to replace it")
    key = generate_node_key(out, args.name)
    result: dict[str, str] = {
        "private_key": str(key.private),
        "public_key": str(key.public),
        "public_key_sha256": public_key_fingerprint(key.public),
    }
    if args.tls_host:
        tls = generate_tls(out, hosts=args.tls_host)
        result |= {
            "ca_cert": str(tls.ca_cert),
            "server_cert": str(tls.server_cert),
            "server_key": str(tls.server_key),
        }
    print(json.dumps(result, indent=2))
    return 0
