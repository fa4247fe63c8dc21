"""`fedpersona users ...`: manage gateway users and their API keys in the registry.

    fedpersona users add NAME [--alpha A] [--reuse-deleted-name]
                                            create a user; prints their first API key once
    fedpersona users issue NAME             another key for an existing user (printed once)
    fedpersona users list [--json]          users with their active keys (never the keys)
    fedpersona users keys [NAME] [--json]   key ids, owners, created/revoked times
    fedpersona users revoke KEY_ID          revoke one key
    fedpersona users revoke --user NAME     revoke all of a user's keys
    fedpersona users delete NAME            delete a user and their keys, quarantine their
                                            adapters; the name is not given out again
    fedpersona users alpha NAME VALUE       set the user's proxy-tuning alpha
    fedpersona users reward-mix NAME [VALUE]
                                            show or set the user's PFIT reward mix (0 to 1)

The raw key goes to stdout alone (scriptable: `KEY=$(fedpersona users add alice)`); everything
else goes to stderr. Works directly on the SQLite registry and the store, so it needs no
running gateway. Values are checked by the same functions as the admin API
(`fedpersona.service.registry`, `fedpersona.service.accounts`,
`fedpersona.service.preferences`); messages name the flag.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from fedpersona.adapters.preferences import reward_mix_problem
from fedpersona.service import accounts, preferences
from fedpersona.service.db import DatabaseError
from fedpersona.service.errors import GatewayError
from fedpersona.service.registry import Registry, check_proxy_alpha, proxy_alpha_problem
from fedpersona.service.settings import Settings
from rich.console import Console
from rich.markup import escape
from rich.table import Table


def _alpha(text: str) -> float:
    """argparse type of alpha values: argparse names the flag in front of the problem."""
    try:
        value = float(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{proxy_alpha_problem(None)}, got {text!r}") from e
    problem = proxy_alpha_problem(value)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return value


def _reward_mix(text: str) -> float:
    """argparse type of reward mixes: the same words as the admin API."""
    try:
        value = float(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{reward_mix_problem(None)}, got {text!r}") from e
    problem = reward_mix_problem(value)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", type=Path, help="fedpersona home (env FEDPERSONA_HOME)")
    parser.add_argument(
        "--registry", type=Path, help="registry file (default <home>/registry.sqlite)"
    )
    sub = parser.add_subparsers(dest="users_command", required=True)

    add = sub.add_parser("add", help="create a user and print their first API key once")
    add.add_argument("name")
    add.add_argument(
        "--alpha", type=_alpha, help="proxy-tuning alpha, 0 to 10 (default from settings)"
    )
    add.add_argument(
        "--reuse-deleted-name",
        action="store_true",
        help="give a deleted user's name to a new user, from a clean slate (refused while the "
        "old user's silo exists; their store slots are quarantined again first)",
    )

    issue = sub.add_parser("issue", help="issue another API key for a user (printed once)")
    issue.add_argument("name")

    listing = sub.add_parser("list", help="list users")
    listing.add_argument("--json", action="store_true", help="machine-readable output")

    keys = sub.add_parser("keys", help="list API keys (ids only)")
    keys.add_argument("name", nargs="?")
    keys.add_argument("--json", action="store_true", help="machine-readable output")

    revoke = sub.add_parser("revoke", help="revoke one key, or all keys of a user")
    target = revoke.add_mutually_exclusive_group(required=True)
    target.add_argument("key_id", nargs="?", help="the key id shown by `users keys`")
    target.add_argument("--user", help="revoke every active key of this user")

    delete = sub.add_parser(
        "delete", help="delete a user and their keys; quarantine their adapters and experts"
    )
    delete.add_argument("name")

    alpha = sub.add_parser("alpha", help="set a user's proxy-tuning alpha (FedPT strength)")
    alpha.add_argument("name")
    alpha.add_argument("value", type=_alpha, help="0 to 10")

    mix = sub.add_parser(
        "reward-mix",
        help="show or set a user's PFIT reward mix: lambda * helpfulness + (1 - lambda) * safety",
    )
    mix.add_argument("name")
    mix.add_argument("value", nargs="?", type=_reward_mix, help="0 to 1 (omit to show)")


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, object] = {}
    if args.home is not None:
        overrides["home"] = args.home
    if args.registry is not None:
        overrides["registry_path"] = args.registry
    return Settings(**overrides)  # type: ignore[arg-type]


def _time(value: float | None) -> str:
    if value is None:
        return "-"
    return datetime.fromtimestamp(value, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def run(args: argparse.Namespace) -> int:
    err = Console(stderr=True)
    try:
        return _run(args, err)
    except GatewayError as e:
        err.print(f"[red]error:[/red] {escape(e.message)}")  # `[a-z]` in a message is no markup
        # docs/cli.md: a refused input (4xx: exists, bad name, unknown user) changed nothing.
        return 2 if e.status < 500 else 1
    except DatabaseError as e:  # unreachable or refused database: one line, nothing changed
        err.print(f"[red]error:[/red] {escape(str(e))}")
        return 1


def _run(args: argparse.Namespace, err: Console) -> int:
    settings = _settings(args)
    registry = Registry(settings.registry_location, default_alpha=settings.proxy_alpha_default)
    store_root = settings.store_path
    command = args.users_command
    if command == "add":
        accounts.create_user(
            registry,
            name=args.name,
            proxy_alpha=None
            if args.alpha is None
            else check_proxy_alpha(args.alpha, field="--alpha"),
            reuse_deleted_name=args.reuse_deleted_name,
            store_root=settings.store_path,
            silos=settings.layout.silos,
        )
        issued = registry.issue_key(args.name)
        err.print(
            f"created user [bold]{args.name}[/bold]; API key id {issued.key_id}. "
            "The key below is shown once: only its hash is stored."
        )
        print(issued.api_key)
    elif command == "issue":
        issued = registry.issue_key(args.name)
        err.print(f"new API key id {issued.key_id} for {args.name} (shown once):")
        print(issued.api_key)
    elif command == "list":
        users = registry.list_users()
        mixes = {u.name: preferences.reward_mix_of(store_root, u.name) for u in users}
        if args.json:
            listed = [{**asdict(u), "reward_mix": mixes[u.name]} for u in users]
            print(json.dumps(listed, indent=2))
        else:
            table = Table("user", "created", "active keys", "proxy alpha", "reward mix")
            for u in users:
                table.add_row(
                    u.name,
                    _time(u.created_at),
                    str(u.active_keys),
                    f"{u.proxy_alpha:g}",
                    f"{mixes[u.name]:g}",
                )
            Console().print(table)
    elif command == "keys":
        keys = registry.list_keys(args.name)
        if args.json:
            print(json.dumps([asdict(k) for k in keys], indent=2))
        else:
            table = Table("key id", "user", "created", "revoked")
            for k in keys:
                table.add_row(k.key_id, k.user, _time(k.created_at), _time(k.revoked_at))
            Console().print(table)
    elif command == "revoke":
        if args.user is not None:
            count = registry.revoke_user_keys(args.user)
            err.print(f"revoked {count} key(s) of {args.user}")
        else:
            info = registry.revoke_key(args.key_id)
            err.print(f"revoked key {info.key_id} of {info.user}")
    elif command == "delete":
        deletion = accounts.delete_user(
            registry, name=args.name, store_root=settings.store_path, silos=settings.layout.silos
        )
        err.print(escape(deletion.message))
    elif command == "alpha":
        user = registry.set_proxy_alpha(args.name, check_proxy_alpha(args.value, field="VALUE"))
        err.print(f"proxy alpha of {user.name} is now {user.proxy_alpha:g}")
    elif command == "reward-mix":
        if args.value is not None:
            preferences.set_reward_mix(
                registry,
                name=args.name,
                reward_mix=args.value,
                store_root=store_root,
                field="VALUE",
            )
            err.print(f"reward mix of {args.name} is now {args.value:g} (from the next round)")
        else:
            registry.get_user(args.name)
        mix = preferences.reward_mix_of(store_root, args.name)
        print(json.dumps({"user": args.name, "reward_mix": mix}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedpersona users")
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # a usage error (printed by argparse, naming the flag) or --help
        return e.code if isinstance(e.code, int) else 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
