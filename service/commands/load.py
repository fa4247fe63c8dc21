"""`fedpersona load`: send a chat workload to running gateways (or engines) and report it.

    fedpersona load --url http://127.0.0.1:8000 --keys keys.json --duration 30 --concurrency 16
    fedpersona load --url URL --keys keys.json --rate 5 --popularity zipf --json --out run.json

`--keys` is a JSON object `{"user": "api key", ...}` (or lines `user key`); each request takes a
user by the chosen popularity and asks for the `personal` model with that user's key. Prints a
table (stdout) or, with `--json`, the summary; `--out` also writes it with every request's
record. Exit 1 when more than `--max-errors` requests failed, so a deployment check can use it.
The workload itself is `fedpersona.service.load.client`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from fedpersona.service.load.client import Caller, LoadResult, Workload, run_load
from rich.console import Console
from rich.table import Table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url", action="append", required=True, help="gateway base URL; repeat for several"
    )
    parser.add_argument(
        "--keys", type=Path, required=True, help='JSON {"user": "key"} or lines "user key"'
    )
    parser.add_argument("--model", default="personal", help="model each request asks for")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load")
    parser.add_argument("--concurrency", type=int, default=8, help="closed-loop callers")
    parser.add_argument(
        "--rate", type=float, help="Poisson arrivals per second (open loop, instead of callers)"
    )
    parser.add_argument(
        "--popularity", choices=("uniform", "zipf"), default="uniform", help="who asks"
    )
    parser.add_argument("--zipf-s", type=float, default=1.1, help="Zipf exponent")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per answer")
    parser.add_argument("--no-stream", action="store_true", help="whole answers, not streams")
    parser.add_argument("--seed", type=int, default=0, help="of user choice and arrivals")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--max-errors", type=int, default=0, help="failed requests tolerated")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--out", type=Path, help="write the summary and every record (JSON)")


def read_keys(path: Path) -> dict[str, str]:
    """`{"user": "key"}` JSON, or one `user key` pair per line."""
    text = path.read_text()
    if text.lstrip().startswith("{"):
        keys = json.loads(text)
        if not isinstance(keys, dict) or not all(isinstance(v, str) for v in keys.values()):
            raise ValueError(f'{path}: expected a JSON object {{"user": "key"}}')
        return {str(k): v for k, v in keys.items()}
    keys = {}
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}:{number}: expected 'user key'")
            keys[parts[0]] = parts[1]
    return keys


def print_table(result: LoadResult, console: Console) -> None:
    s = result.summary()
    table = Table(title=f"load: {s['requests']} requests in {s['wall_s']:.1f} s")
    for column in ("requests", "errors", "req/s", "tok/s", "TTFT p50", "TTFT p95", "lat p95"):
        table.add_column(column, justify="right")

    def ms(value: Any) -> str:
        return "-" if value is None else f"{value:.1f} ms"

    table.add_row(
        str(s["requests"]),
        str(s["errors"]),
        f"{s['requests_per_s']:.1f}",
        f"{s['tokens_per_s']:.0f}",
        ms(s["ttft_ms"]["p50"]),
        ms(s["ttft_ms"]["p95"]),
        ms(s["latency_ms"]["p95"]),
    )
    console.print(table)
    if s["error_kinds"]:
        console.print(f"errors by kind: {s['error_kinds']}")


def run(args: argparse.Namespace) -> int:
    err = Console(stderr=True)
    try:
        keys = read_keys(args.keys)
        workload = Workload(
            duration_s=args.duration,
            concurrency=args.concurrency,
            rate_rps=args.rate,
            popularity=args.popularity,
            zipf_s=args.zipf_s,
            max_tokens=args.max_tokens,
            stream=not args.no_stream,
            seed=args.seed,
            request_timeout_s=args.timeout,
        )
    except (OSError, ValueError) as e:
        err.print(f"error: {e}")
        return 2
    if not keys:
        err.print(f"error: --keys {args.keys} names no user")
        return 2
    callers = [Caller(user, key, args.model) for user, key in sorted(keys.items())]
    result = asyncio.run(run_load(workload, callers, args.url))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result.to_json(records=True), indent=2) + "\n")
    if args.json:
        sys.stdout.write(json.dumps(result.summary(), indent=2) + "\n")
    else:
        print_table(result, Console())
    failed = result.summary()["errors"]
    if failed > args.max_errors:
        err.print(f"{failed} requests failed (--max-errors {args.max_errors})")
        return 1
    return 0
