"""Base model recipes: the value types that determine a built model, and no build code.

`Recipe` (with its `ModelSize`s) is everything that determines the large and small model of a
build; its `hash()` keys the cache of `fedpersona.trainer.models.basemodel`. `MICRO` (tests) and
`TINY` (`fedpersona models bootstrap`) are the recipes shipped. Both the cache side (`basemodel`)
and the torch side (`pretrain`) import this module; it imports neither of them, nor torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

HEAD_DIM = 64  # the vLLM CPU attention kernels reject smaller heads
ROLES: tuple[str, ...] = ("large", "small")
MARKER = "fedpersona.json"

# Bump when the build procedure changes in a way the recipe fields do not capture.
BUILD_VERSION = 2


@dataclass(frozen=True)
class ModelSize:
    """Shape of one Llama model."""

    layers: int
    hidden: int
    heads: int
    intermediate: int

    def __post_init__(self) -> None:
        for field in ("layers", "hidden", "heads", "intermediate"):
            if getattr(self, field) < 1:
                raise ValueError(f"ModelSize.{field} must be positive, got {getattr(self, field)}")
        if self.hidden != self.heads * HEAD_DIM:
            raise ValueError(
                f"ModelSize.hidden ({self.hidden}) must equal heads ({self.heads}) x {HEAD_DIM}: "
                f"vLLM's CPU attention needs head_dim {HEAD_DIM}"
            )


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the built models; its `hash()` keys the cache."""

    name: str
    large: ModelSize
    small: ModelSize
    vocab_size: int
    max_position_embeddings: int
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    seed: int
    # chats per persona in the default corpus (ignored when a corpus is given)
    corpus_per_persona: int
    # sha256 of the pretraining text; filled in by `build_models` (`with_corpus`)
    corpus_sha256: str = ""

    def __post_init__(self) -> None:
        if not self.name.isidentifier() or not self.name.islower():
            raise ValueError(f"Recipe.name must be a lower-case identifier, got {self.name!r}")
        if self.steps < 0:
            raise ValueError(f"Recipe.steps must be >= 0, got {self.steps}")
        for field in ("batch_size", "seq_len", "corpus_per_persona"):
            if getattr(self, field) < 1:
                raise ValueError(f"Recipe.{field} must be positive, got {getattr(self, field)}")
        if self.seq_len > self.max_position_embeddings:
            raise ValueError(
                f"Recipe.seq_len ({self.seq_len}) exceeds max_position_embeddings "
                f"({self.max_position_embeddings})"
            )
        if not self.lr > 0:
            raise ValueError(f"Recipe.lr must be positive, got {self.lr}")

    def hash(self) -> str:
        """16 hex chars over every field and the build version."""
        payload = json.dumps(
            {"build_version": BUILD_VERSION, **dataclasses.asdict(self)}, sort_keys=True
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def with_corpus(self, text: str) -> Recipe:
        return dataclasses.replace(self, corpus_sha256=hashlib.sha256(text.encode()).hexdigest())

    def model_name(self, role: str) -> str:
        return f"fedpersona-{self.name}-{role}"

    def size(self, role: str) -> ModelSize:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
        return self.large if role == "large" else self.small


# Tests: builds in a few seconds, pretraining is a handful of steps.
MICRO = Recipe(
    name="micro",
    large=ModelSize(layers=2, hidden=128, heads=2, intermediate=256),
    small=ModelSize(layers=1, hidden=128, heads=2, intermediate=256),
    vocab_size=400,
    max_position_embeddings=512,
    steps=4,
    batch_size=4,
    seq_len=64,
    lr=3e-3,
    seed=0,
    corpus_per_persona=40,
)

# `fedpersona models bootstrap`: briefly pretrained, served by vLLM.
TINY = Recipe(
    name="tiny",
    large=ModelSize(layers=4, hidden=256, heads=4, intermediate=688),
    small=ModelSize(layers=2, hidden=128, heads=2, intermediate=344),
    vocab_size=2048,
    max_position_embeddings=1024,
    steps=150,
    batch_size=16,
    seq_len=128,
    lr=2e-3,
    seed=0,
    corpus_per_persona=300,
)

RECIPES: dict[str, Recipe] = {r.name: r for r in (MICRO, TINY)}
