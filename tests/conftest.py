"""Session fixtures shared by every test package.

`micro_models` builds the MICRO base models once and caches them on disk under
`<repo>/.cache/models/` keyed by the recipe hash, so later sessions (and parallel ones: the build
is locked and renamed into place) reuse them in milliseconds. torch and transformers are imported
only when a test asks for the fixture.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import settings

if TYPE_CHECKING:
    from fedpersona.trainer.models.basemodel import ModelPair

REPO = Path(__file__).resolve().parent.parent
MODEL_CACHE = REPO / ".cache" / "models"

# Property tests check behaviour, not speed: no per-example deadline (the default 200 ms fails
# them spuriously on a loaded machine). Their example counts stay as each test sets them.
settings.register_profile("fedpersona", deadline=None)
settings.load_profile("fedpersona")


@pytest.fixture(scope="session")
def micro_models() -> ModelPair:
    """The MICRO large + small Llama pair (Hugging Face dirs with tokenizer and chat template)."""
    from fedpersona.trainer.models.basemodel import MICRO, build_models

    return build_models(MODEL_CACHE / f"micro-{MICRO.hash()}", MICRO, progress=False)
