"""Property-based fuzzing of the whole HTTP API against `fedpersona serve` in front of real vLLM.

The suite's fuzz test (`tests/service/test_gateway_fuzz.py`) drives the app in-process over a
fake engine; this run drives the real thing: `fedpersona serve` as a subprocess (gateway under
its own uvicorn configuration, supervising its own vLLM child) on a throw-away home holding the
micro base models (built once and cached by `tests/conftest.py`'s recipe cache), one user and an
admin key. schemathesis generates cases from the gateway's own `/openapi.json` for every
operation, once per credential (none, a user key, the admin key; admin last because it may
delete the user), bounded by `--max-examples` (spread over the operations) and `--time-limit`.

Every other chat case names the user's `personal` model so that its fields reach vLLM rather
than ending at the router's 404. Properties counted (never stopping at the first failure):
responses with status 5xx, responses that violate the schema (schemathesis'
`response_schema_conformance`), and 4xx answers without the OpenAI error envelope. Output: a
table on stdout and JSON under `benchmarks/results/`.

    .venv/bin/python benchmarks/fuzz_api.py --max-examples 1500 --time-limit 600
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
ADMIN_KEY = "fuzz-admin-key-0123456789abcdef"
ENVELOPE_KEYS = {"message", "type", "param", "code"}
CREDENTIALS = ("none", "user", "admin")
# 5xx answers that are the documented refusal of this configuration, not faults: the server runs
# with --no-rounds (fuzzed rounds would start real training), so /admin/rounds is 503.
EXPECTED_5XX = {"rounds_unavailable"}
CHAT = "/v1/chat/completions"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fedpersona(*args: str, env: dict[str, str]) -> str:
    exe = [sys.executable, "-m", "fedpersona.cli", *args]
    done = subprocess.run(exe, env=env, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise SystemExit(f"fedpersona {' '.join(args)} failed: {done.stderr[-2000:]}")
    return done.stdout


def _prepare_home(home: Path) -> None:
    """The micro pair from the test suite's model cache, copied into `<home>/models/`."""
    from fedpersona.trainer.models.basemodel import MICRO, build_models

    pair = build_models(REPO / ".cache" / "models" / f"micro-{MICRO.hash()}", MICRO, progress=False)
    for role, info in (("large", pair.large), ("small", pair.small)):
        shutil.copytree(info.path, home / "models" / role)


def _wait_ready(root: str, proc: subprocess.Popen[bytes], timeout_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if proc.poll() is not None:
            raise SystemExit(f"fedpersona serve exited with {proc.returncode}")
        try:
            if httpx.get(f"{root}/ready", timeout=5).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"fedpersona serve not ready within {timeout_s:.0f} s")


def _error_code(response: Any) -> str | None:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return None


class Tally:
    def __init__(self) -> None:
        self.cases = 0
        self.statuses: Counter[int] = Counter()
        self.by_credential: dict[str, Counter[int]] = {c: Counter() for c in CREDENTIALS}
        self.server_errors: list[dict[str, Any]] = []
        self.schema_violations: list[dict[str, Any]] = []
        self.no_envelope: list[dict[str, Any]] = []
        self.transport_errors: list[dict[str, Any]] = []
        self.expected_5xx = 0
        self.by_operation: Counter[str] = Counter()

    def example(self, case: Any, who: str, status: int | None, detail: str) -> dict[str, Any]:
        return {
            "credential": who,
            "method": case.method,
            "path": case.formatted_path,
            "status": status,
            "detail": detail[:500],
            "body": repr(case.body)[:300],
        }


def fuzz(root: str, keys: dict[str, str | None], args: argparse.Namespace) -> Tally:
    import schemathesis

    schema = schemathesis.openapi.from_url(f"{root}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    budget = math.ceil(args.max_examples / len(CREDENTIALS))  # cases per credential
    deadline = time.monotonic() + args.time_limit
    tally = Tally()

    for i, who in enumerate(CREDENTIALS):
        key = keys[who]
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        cap = min(args.max_examples, budget * (i + 1))
        # Some operations run out of distinct examples early: give each more than its share
        # and sweep again until the credential's budget is spent.
        for _ in range(3):
            if tally.cases >= cap or time.monotonic() > deadline:
                break
            per_op = max(2, math.ceil(2 * (cap - tally.cases) / len(operations)))
            for op in operations:
                # The chat operation is the one that reaches the engine: four shares.
                share = per_op * (4 if op.path == CHAT else 1)
                _fuzz_operation(op, who, headers, share, deadline, root, tally, cap)
    return tally


def _fuzz_operation(
    op: Any,
    who: str,
    headers: dict[str, str],
    per_op: int,
    deadline: float,
    root: str,
    tally: Tally,
    cap: int,
) -> None:
    from hypothesis import HealthCheck, given, settings
    from schemathesis.specs.openapi.checks import response_schema_conformance

    @settings(
        max_examples=per_op,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(case=op.as_strategy())
    def run(case: Any) -> None:
        if time.monotonic() > deadline or tally.cases >= cap:
            return
        case.headers = {**(case.headers or {}), **headers}
        tally.cases += 1
        if op.path == CHAT and isinstance(case.body, dict) and tally.cases % 2:
            # Random model names end at the router (404): every other chat case names a model
            # the user may use, so its other fields reach the real engine.
            case.body["model"] = "personal"
        try:
            response = case.call(base_url=root, timeout=120)
        except Exception as e:  # a dropped connection is a finding, not a crash
            tally.transport_errors.append(tally.example(case, who, None, repr(e)))
            return
        status = response.status_code
        tally.statuses[status] += 1
        tally.by_credential[who][status] += 1
        tally.by_operation[f"{who} {op.method.upper()} {op.path} {status}"] += 1
        if status >= 500 and _error_code(response) in EXPECTED_5XX:
            tally.expected_5xx += 1
        elif status >= 500:
            tally.server_errors.append(tally.example(case, who, status, response.text))
        elif status >= 400:
            try:
                error = response.json()["error"]
                ok = set(error) == ENVELOPE_KEYS
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                tally.no_envelope.append(tally.example(case, who, status, response.text))
        try:
            case.validate_response(response, checks=[response_schema_conformance])
        except Exception as e:
            tally.schema_violations.append(tally.example(case, who, status, str(e)))

    run()


def report(tally: Tally, meta: dict[str, Any]) -> dict[str, Any]:
    result = {
        **meta,
        "cases": tally.cases,
        "status_histogram": {str(k): v for k, v in sorted(tally.statuses.items())},
        "by_credential": {
            who: {str(k): v for k, v in sorted(c.items())} for who, c in tally.by_credential.items()
        },
        "by_operation": dict(sorted(tally.by_operation.items())),
        "server_errors_5xx": len(tally.server_errors),
        "expected_5xx": tally.expected_5xx,
        "expected_5xx_codes": sorted(EXPECTED_5XX),
        "schema_violations": len(tally.schema_violations),
        "4xx_without_envelope": len(tally.no_envelope),
        "transport_errors": len(tally.transport_errors),
        "examples": {
            "server_errors_5xx": tally.server_errors[:20],
            "schema_violations": tally.schema_violations[:20],
            "4xx_without_envelope": tally.no_envelope[:20],
            "transport_errors": tally.transport_errors[:20],
        },
    }
    rows = [
        ("cases", tally.cases),
        ("5xx responses (faults)", result["server_errors_5xx"]),
        ("503 rounds_unavailable (expected)", tally.expected_5xx),
        ("schema violations", result["schema_violations"]),
        ("4xx without OpenAI envelope", result["4xx_without_envelope"]),
        ("transport errors", result["transport_errors"]),
        *((f"status {k}", v) for k, v in result["status_histogram"].items()),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"\nfuzz_api against fedpersona serve + vLLM ({meta['seconds']:.0f} s fuzzing)")
    print("-" * (width + 10))
    for name, value in rows:
        print(f"{name:<{width}}  {value:>7}")
    for who, counts in result["by_credential"].items():
        print(f"  {who:<6} {counts}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--max-examples", type=int, default=2000, help="cases in all (default: 2000)"
    )
    parser.add_argument(
        "--time-limit", type=float, default=1800, help="seconds of fuzzing (default: 1800)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "fuzz_api.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fuzz-api-"))
    home = work / "home"
    env = {
        **os.environ,
        "FEDPERSONA_HOME": str(home),
        "FEDPERSONA_ADMIN_KEY": ADMIN_KEY,
        "FEDPERSONA_RATE_LIMIT_RPM": "0",
        "FEDPERSONA_DOCS": "true",
    }
    proc: subprocess.Popen[bytes] | None = None
    try:
        _prepare_home(home)
        user_key = _fedpersona("users", "add", "alice", "--home", str(home), env=env).strip()
        port, engine_port = _free_port(), _free_port()
        log = (work / "serve.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedpersona.cli", "serve", "--home", str(home),
             "--port", str(port), "--engine-port", str(engine_port), "--no-rounds"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        root = f"http://127.0.0.1:{port}"
        ready_s = _wait_ready(root, proc, 600)
        print(f"fedpersona serve ready in {ready_s:.0f} s at {root}", flush=True)
        started = time.monotonic()
        tally = fuzz(root, {"none": None, "user": user_key, "admin": ADMIN_KEY}, args)
        meta = {
            "command": " ".join(["benchmarks/fuzz_api.py", *sys.argv[1:]]),
            "target": "fedpersona serve (gateway + supervised vLLM, micro model)",
            "max_examples": args.max_examples,
            "time_limit_s": args.time_limit,
            "ready_s": round(ready_s, 1),
            "seconds": round(time.monotonic() - started, 1),
        }
        result = report(tally, meta)
        alive = proc.poll() is None
        result["server_alive_after"] = alive
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"server alive after: {alive}; saved {args.out}")
        bad = result["server_errors_5xx"] + result["schema_violations"]
        return 0 if bad == 0 and alive else 1
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
