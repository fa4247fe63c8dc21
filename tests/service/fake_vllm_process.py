"""A stand-in for the vLLM server process, for supervisor tests: a tiny stdlib HTTP server.

Run as `python fake_vllm_process.py --port P [--startup-delay S] [--exit-at-start]
[--ignore-sigterm] [--reply-delay S] [--unhealthy-after S] [--engine-core-pidfile F]`.
`--engine-core-pidfile` starts a long-lived child in the same process group (like vLLM's
engine core, which outlives a killed API server) and writes its pid to F.
It answers `GET /health` (200 once
"started") and `POST /v1/chat/completions` (after `--reply-delay`), logs to stdout like a server,
and on SIGTERM exits 0 unless told to ignore it.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--startup-delay", type=float, default=0.0)
    parser.add_argument("--reply-delay", type=float, default=0.0)
    parser.add_argument("--unhealthy-after", type=float, default=None)
    parser.add_argument("--exit-at-start", action="store_true")
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--engine-core-pidfile", default=None)
    args = parser.parse_args()
    if args.engine_core_pidfile:
        import subprocess

        core = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        with open(args.engine_core_pidfile, "w") as f:
            f.write(str(core.pid))

    print(f"fake vllm: loading model (pid {__import__('os').getpid()})", flush=True)
    if args.exit_at_start:
        print("ValueError: fake vllm: no such model directory", flush=True)
        return 1
    started = time.monotonic()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *a: object) -> None:
            print("fake vllm: " + format % a, flush=True)

        def _send(self, status: int, body: dict[str, object]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            age = time.monotonic() - started
            up = age >= args.startup_delay and (
                args.unhealthy_after is None or age < args.unhealthy_after
            )
            if self.path == "/health" and up:
                self._send(200, {})
            else:
                self._send(503, {"error": {"message": "starting"}})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length) or b"{}")
            time.sleep(args.reply_delay)
            self._send(
                200, {"model": body.get("model"), "choices": [], "object": "chat.completion"}
            )

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True

    def on_term(signum: int, frame: object) -> None:
        if args.ignore_sigterm:
            print("fake vllm: ignoring SIGTERM", flush=True)
            return
        print("fake vllm: SIGTERM, shutting down", flush=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)
    print(f"fake vllm: listening on {args.port}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
