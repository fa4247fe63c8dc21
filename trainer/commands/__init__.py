"""Trainer subcommands of `fedpersona`, registered by the root CLI (`fedpersona.cli`).

Each module named here exposes `add_arguments(parser)` and `run(args) -> int`; a space in a name
makes a nested command ("models bootstrap"). The trainer pod's HTTP API (`fedpersona trainer`)
is not here: it is composed from both packages in the root (`fedpersona.trainer_api`).
"""

from __future__ import annotations

# subcommand -> (module, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "models bootstrap": (
        "fedpersona.trainer.commands.models",
        "build (or reuse) the default base models: SmolLM2-135M-Instruct and its proxy",
    ),
    "models import": (
        "fedpersona.trainer.commands.model_import",
        "import a GGUF file or a Hugging Face directory as a served model",
    ),
    "models rewards": (
        "fedpersona.trainer.commands.rewards",
        "build (or reuse) the default helpfulness and safety reward models (PFIT)",
    ),
    "data shakespeare": (
        "fedpersona.trainer.data.shakespeare",
        "turn tinyshakespeare into per-speaker chat silos",
    ),
    "train": ("fedpersona.trainer.commands.train", "run federated rounds and publish adapters"),
    "eval": ("fedpersona.trainer.commands.eval", "per-user held-out perplexity for each method"),
    "nodes keygen": (
        "fedpersona.trainer.commands.nodes",
        "a SuperNode key pair (and SuperLink TLS files) for authenticated federation",
    ),
    "nodes register": (
        "fedpersona.trainer.commands.nodes_register",
        "register a SuperNode's public key and bind its node id to users",
    ),
}
