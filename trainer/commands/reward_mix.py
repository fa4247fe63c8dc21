"""`fedpersona reward-mix USER [LAMBDA]`: show or set a user's reward mix for PFIT.

The mix lambda_u in [0, 1] weighs the user's reward as `lambda * helpfulness + (1 - lambda) *
safety`; it is kept in the user's silo (`<home>/silos/<user>/preferences.json`, or `--silo`),
where the client reads it each round (`fedpersona.trainer.rlhf.mix`). Out-of-range or
non-numeric values are refused (exit 2) and nothing is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedpersona.adapters.home import resolve_home


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("user", help="user id (their silo is <home>/silos/<user>)")
    parser.add_argument(
        "reward_mix", nargs="?", type=float, default=None, help="lambda in [0, 1] (omit to show)"
    )
    parser.add_argument("--home", type=Path, default=None, help="fedpersona home")
    parser.add_argument("--silo", type=Path, default=None, help="the user's silo directory")


def run(args: argparse.Namespace) -> int:
    from fedpersona.adapters import InvalidName, validate_user_id
    from fedpersona.trainer.errors import RewardModelError
    from fedpersona.trainer.rlhf.mix import Preferences, read_preferences, write_preferences

    try:
        validate_user_id(args.user)
    except InvalidName as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    silo = args.silo or resolve_home(args.home) / "silos" / args.user
    try:
        if args.reward_mix is not None:
            write_preferences(silo, Preferences(reward_mix=args.reward_mix))
        preferences = read_preferences(silo)
    except RewardModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"user": args.user, "reward_mix": preferences.reward_mix}))
    return 0
