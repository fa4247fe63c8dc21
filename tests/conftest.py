"""Session fixtures shared by every test package.

`micro_models` builds the MICRO base models once and caches them on disk under
`<repo>/.cache/models/` keyed by the recipe hash, so later sessions (and parallel ones: the build
is locked and renamed into place) reuse them in milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.basemodel import MICRO, ModelPair, build_models

REPO = Path(__file__).resolve().parent.parent
MODEL_CACHE = REPO / ".cache" / "models"


@pytest.fixture(scope="session")
def micro_models() -> ModelPair:
    """The MICRO large + small Llama pair (Hugging Face dirs with tokenizer and chat template)."""
    return build_models(MODEL_CACHE / f"micro-{MICRO.hash()}", MICRO, progress=False)
