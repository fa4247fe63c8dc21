"""A validation home carved from each user's *train* split, for hyper-parameter selection.

`carve(silos, out)` writes, for every user silo under `silos`, a silo under `out` whose
`train.jsonl` is the first part of the user's `train.jsonl` and whose `eval.jsonl` is its last
`fraction` (at least one chat). The user's held-out `eval.jsonl` is never opened, so no choice
made on the validation home can see a held-out chat (`docs/evaluation.md`). Plain text copies;
this module knows nothing about models or methods.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from fedpersona.trainer.errors import DataError

DEFAULT_FRACTION = 0.15


def split_lines(
    lines: list[str], fraction: float = DEFAULT_FRACTION
) -> tuple[list[str], list[str]]:
    """(train, validation): the last `fraction` of `lines` (at least one) is validation."""
    if not 0 < fraction < 1:
        raise DataError(f"the validation fraction must lie in (0, 1), got {fraction}")
    if len(lines) < 2:
        raise DataError(f"cannot carve a validation split from {len(lines)} chat(s)")
    n_val = min(len(lines) - 1, max(1, math.ceil(len(lines) * fraction)))
    return lines[:-n_val], lines[-n_val:]


def carve(
    silos: Path, out: Path, *, users: list[str], fraction: float = DEFAULT_FRACTION
) -> dict[str, Path]:
    """Write `out/<user>/{train,eval}.jsonl` from `silos/<user>/train.jsonl`; user -> silo."""
    result = {}
    for user in users:
        source = Path(silos) / user / "train.jsonl"
        try:
            lines = [line for line in source.read_text(encoding="utf-8").splitlines() if line]
        except OSError as e:
            raise DataError(f"{source}: cannot read: {e}") from e
        train, validation = split_lines(lines, fraction)
        target = Path(out) / user
        target.mkdir(parents=True, exist_ok=True)
        (target / "train.jsonl").write_text("\n".join(train) + "\n", encoding="utf-8")
        (target / "eval.jsonl").write_text("\n".join(validation) + "\n", encoding="utf-8")
        result[user] = target
    return result


def check_silos(silos: Mapping[str, Path]) -> list[str]:
    """Every user's silo checked before a round: one `file:line: what is wrong` per bad file.

    `silos` maps user -> silo directory. Both splits are read in full with the silo reader's
    own checks (`read_chats`), so a problem that would fail a client mid-round is found before
    any training starts; a file with no chat is a problem too. Empty list: all usable.
    """
    # The silo reader pulls in torch; only a round's pre-flight needs it here.
    from fedpersona.trainer.data.silo import SPLITS, read_chats, silo_file

    problems = []
    for user, silo in silos.items():
        for split in SPLITS:
            path = silo_file(silo, split)
            try:
                if not read_chats(path):
                    problems.append(f"{path}: no chat (user {user} has nothing to {split} on)")
            except DataError as e:
                problems.append(str(e))
    return problems
