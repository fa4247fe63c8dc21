"""Gateway subcommands of `fedpersona`, registered by the root CLI (`fedpersona.cli`).

Each module named here exposes `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

# subcommand -> (module, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": (
        "fedpersona.service.commands.serve",
        "run the OpenAI-compatible gateway (and, by default, vLLM)",
    ),
    "engine": (
        "fedpersona.service.commands.engine",
        "print or run the exact vLLM command the gateway would run",
    ),
    "users": ("fedpersona.service.commands.users", "manage users and their API keys"),
    "load": ("fedpersona.service.commands.load", "send a chat workload to gateways and report it"),
}
