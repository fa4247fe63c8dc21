"""Where the round controller's runs go on Flower's Deployment Engine, and for whom.

`SuperLinkTarget` is the trainer pod's answer to "submit to which SuperLink, trusting which CA,
with which node bindings": the controller appends `child_args()` to the training child's command
line (`fedpersona train --superlink ... --root-certificates ... --node-bindings ...`), so every
run it starts carries the operator's bindings into the ServerApp (run config `node-bindings`),
which then drops replies for any user the sending node is not bound to. The run's users are the
spec's (each must be bound to a node) or every bound user; the bindings file is read at each run
start, so an operator's update reaches the next run without a restart.

A SuperLink with TLS (and therefore SuperNode authentication) without bindings is refused: its
authenticated nodes would still choose their users themselves. Plain gRPC (`root_certificates`
None) is the loopback plumbing mode. This module starts nothing and knows nothing about HTTP.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedpersona.trainer.errors import ConfigError, InvalidRoundSpec


@dataclass(frozen=True)
class SuperLinkTarget:
    """A SuperLink's Control API (`host:port`), its CA file and the node bindings file."""

    control: str
    root_certificates: Path | None = None
    node_bindings: Path | None = None

    def __post_init__(self) -> None:
        if not self.control or ":" not in self.control:
            raise ConfigError(f"SuperLink control address must be host:port, got {self.control!r}")
        if self.root_certificates is not None and self.node_bindings is None:
            raise ConfigError(
                "a SuperLink with TLS and SuperNode authentication needs node bindings "
                "(--node-bindings, written by `fedpersona nodes register`): without them an "
                "authenticated node could still train as any user"
            )

    def child_args(self) -> list[str]:
        """The training child's flags for this target (`fedpersona.trainer.commands.train`)."""
        args = ["--superlink", self.control]
        if self.root_certificates is not None:
            args += ["--root-certificates", str(self.root_certificates)]
        if self.node_bindings is not None:
            args += ["--node-bindings", str(self.node_bindings)]
        return args

    def resolve_users(self, users: Sequence[str] | None) -> list[str]:
        """The users a run trains: `users` (each bound to a node) or every bound user.

        Raises `InvalidRoundSpec` (HTTP 400) for an unbound user, no bound user at all, or an
        unreadable bindings file.
        """
        if self.node_bindings is None:
            if not users:
                raise InvalidRoundSpec(
                    "name the run's users: without node bindings the trainer cannot know which "
                    "users the SuperNodes serve",
                    param="users",
                )
            return list(users)
        from fedpersona.trainer.flower.identity import NodeBindings

        try:
            bindings = NodeBindings.load(self.node_bindings)
        except ConfigError as e:
            raise InvalidRoundSpec(str(e), param="users") from e
        bound = sorted({u for users_of in bindings.as_mapping().values() for u in users_of})
        if users is None:
            if not bound:
                raise InvalidRoundSpec(
                    f"no node is bound to a user in {self.node_bindings}: register the nodes "
                    "with `fedpersona nodes register --users ...` first",
                    param="users",
                )
            return bound
        unbound = [u for u in users if u not in bound]
        if unbound:
            raise InvalidRoundSpec(
                f"no registered node is bound to {', '.join(unbound)} "
                f"(node bindings: {self.node_bindings})",
                param="users",
            )
        return list(users)
