"""Which replies a round accepts: a node's authenticated id decides whom it may speak for.

`Admission` is pure: given the operator's bindings (authenticated node id -> users, from
`fedpersona.trainer.flower.identity.NodeBindings`), the users a round trains and the cap on a
client's example count, it says which connected nodes get the global (`eligible`) and checks
each reply (`admit`): the user the reply names must be one its node is bound to and one the round
trains, and its `num_examples` must be a positive integer (values above the cap are lowered to
it, so a client cannot buy itself a larger share of the mean by claiming more data).

Without bindings (the Simulation Engine, where every node is a virtual one started by this
process) only the round's users and the example cap are checked.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from fedpersona.trainer.errors import ReplyRefused


@dataclass(frozen=True)
class Admission:
    bindings: Mapping[int, frozenset[str]] | None = None
    round_users: frozenset[str] | None = None
    max_examples: int = 100_000

    def eligible(self, node_ids: Iterable[int]) -> list[int]:
        """The connected nodes a round sends the global to (bound ones only, with bindings)."""
        nodes = sorted(node_ids)
        if self.bindings is None:
            return nodes
        return [n for n in nodes if self.bindings.get(n)]

    def admit(self, *, node_id: int, user: str, num_examples: object) -> int:
        """The example count to weight this reply by; `ReplyRefused` if it must be dropped."""
        if self.bindings is not None:
            allowed = self.bindings.get(node_id, frozenset())
            if not allowed:
                raise ReplyRefused(f"node {node_id} is not bound to any user")
            if user not in allowed:
                raise ReplyRefused(
                    f"node {node_id} may train for {sorted(allowed)}, not for {user!r}"
                )
        if self.round_users is not None and user not in self.round_users:
            raise ReplyRefused(f"node {node_id}: user {user!r} is not in this round")
        if isinstance(num_examples, bool) or not isinstance(num_examples, int):
            raise ReplyRefused(f"node {node_id} ({user}): num-examples must be an integer")
        if num_examples <= 0:
            raise ReplyRefused(f"node {node_id} ({user}) trained on no examples")
        return min(num_examples, self.max_examples)
