"""`fedpersona nodes register`: admit a SuperNode's key and bind its node id to users.

Runs `flwr supernode register` against the SuperLink's control API (TLS, with the CA file) and
records `node id -> users` in the bindings file the ServerApp reads (run config
`node-bindings`): the one place an operator says whom a device may train for.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedpersona.trainer.commands.spec_args import comma_list
from fedpersona.trainer.flower.deployment import register_node


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("public_key", type=Path, help="the node's .pub file (nodes keygen)")
    parser.add_argument("--users", type=comma_list, required=True, metavar="A,B")
    parser.add_argument("--control", required=True, help="SuperLink control API host:port")
    parser.add_argument("--root-certificates", type=Path, default=None, help="the CA file")
    parser.add_argument("--bindings", type=Path, required=True, help="node bindings JSON file")
    parser.add_argument(
        "--flwr-home", type=Path, default=Path(".flwr"), help="Flower CLI config folder"
    )


def run(args: argparse.Namespace) -> int:
    binding = register_node(
        args.public_key,
        control=args.control,
        flwr_home=args.flwr_home.resolve(),
        root_certificates=args.root_certificates,
        users=args.users,
        bindings_file=args.bindings,
    )
    print(json.dumps({"node_id": binding.node_id, "users": list(binding.users)}))
    return 0
