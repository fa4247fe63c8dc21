"""`fedpersona data shakespeare`: tinyshakespeare -> one chat silo per speaking role (LEAF-style).

LEAF's Shakespeare benchmark makes every speaking role a federated client: naturally non-IID
data where each client has its own voice. Here every turn becomes one chat:

    user:      the previous block of the play, as written ("SPEAKER:\\n" + its lines)
    assistant: this speaker's lines (without the header)

- The corpus is blocks separated by blank lines; a block is a `NAME:` header line followed by
  the lines spoken. Header-only blocks (nothing spoken) are skipped; a block without a header
  is an error naming its line. The corpus's first speech has no context and is no turn.
- A speaker's user id is its name sanitized to the store's rule (lower case, runs of other
  characters -> `_`, `^[a-z0-9][a-z0-9_-]{0,62}$`); names that sanitize to the same id are one
  user.
- The `users` speakers with the most turns (ties: by id) among those with at least `min_turns`
  turns become silos. Each keeps its turns in corpus order and holds out the *last*
  `eval_fraction` of them (rounded; at least one, never all) in `eval.jsonl`, so evaluation is
  on later dialogue, never on a random shuffle of the same scenes.
- Output: `<out>/<user>/train.jsonl`, `eval.jsonl` (each written to a temporary file and
  renamed) and `<out>/shakespeare.json` describing the split.

Parsing and splitting are pure; `write_silos`, `convert` and `run` do the I/O. The corpus path
is always an argument: no data location is built in.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedpersona.trainer.errors import DataError

log = logging.getLogger(__name__)

MANIFEST = "shakespeare.json"
_HEADER_RE = re.compile(r"^(?P<name>[^\s:][^:]*):\s*$")


@dataclass(frozen=True)
class Block:
    """One speech: who spoke, the lines, and the 1-based corpus line of its header."""

    speaker: str
    text: str
    line: int


@dataclass(frozen=True)
class Silo:
    """One user's chats: a speaker's turns, split into train and held-out eval."""

    user: str
    speakers: tuple[str, ...]
    train: tuple[dict[str, list[dict[str, str]]], ...]
    eval: tuple[dict[str, list[dict[str, str]]], ...]


def user_id(speaker: str) -> str:
    """The store-safe user id of a speaker's name ("KING RICHARD II" -> "king_richard_ii")."""
    # Imported here: `adapters` loads torch, and the CLI imports this module to build its parser.
    from fedpersona.adapters import validate_user_id

    slug = re.sub(r"[^a-z0-9]+", "_", speaker.lower()).strip("_")[:63].rstrip("_")
    return validate_user_id(slug or "speaker")


def parse_blocks(text: str) -> list[Block]:
    """The non-empty speeches of a tinyshakespeare-format corpus, in order."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        start = i
        while i < len(lines) and lines[i].strip():
            i += 1
        header, body = lines[start], lines[start + 1 : i]
        match = _HEADER_RE.match(header)
        if match is None:
            raise DataError(
                f"line {start + 1}: a block must start with a 'SPEAKER:' line, got {header!r}"
            )
        spoken = "\n".join(line.rstrip() for line in body).strip()
        if spoken:
            blocks.append(Block(speaker=match["name"].strip(), text=spoken, line=start + 1))
    return blocks


def build_silos(
    blocks: Sequence[Block], *, users: int, eval_fraction: float, min_turns: int
) -> list[Silo]:
    """Chats per speaker, the `users` speakers with the most turns, last turns held out."""
    if users < 1:
        raise DataError(f"--speakers must be at least 1, got {users}")
    if not 0 < eval_fraction < 1:
        raise DataError(f"--eval-fraction must be between 0 and 1, got {eval_fraction}")
    if min_turns < 2:
        raise DataError(f"--min-turns must be at least 2 (one train, one eval), got {min_turns}")
    turns: dict[str, list[dict[str, list[dict[str, str]]]]] = {}
    names: dict[str, set[str]] = {}
    for previous, block in itertools.pairwise(blocks):
        user = user_id(block.speaker)
        context = f"{previous.speaker}:\n{previous.text}"
        chat = {
            "messages": [
                {"role": "user", "content": context},
                {"role": "assistant", "content": block.text},
            ]
        }
        turns.setdefault(user, []).append(chat)
        names.setdefault(user, set()).add(block.speaker)
    eligible = sorted(
        (u for u, chats in turns.items() if len(chats) >= min_turns),
        key=lambda u: (-len(turns[u]), u),
    )
    if len(eligible) < users:
        raise DataError(
            f"only {len(eligible)} speakers have at least {min_turns} turns; "
            f"lower --speakers ({users}) or --min-turns"
        )
    silos = []
    for user in eligible[:users]:
        chats = turns[user]
        n_eval = min(len(chats) - 1, max(1, round(len(chats) * eval_fraction)))
        silos.append(
            Silo(
                user=user,
                speakers=tuple(sorted(names[user])),
                train=tuple(chats[: len(chats) - n_eval]),
                eval=tuple(chats[len(chats) - n_eval :]),
            )
        )
    return silos


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _jsonl(chats: Sequence[dict[str, list[dict[str, str]]]]) -> str:
    return "".join(json.dumps(chat, ensure_ascii=False) + "\n" for chat in chats)


def write_silos(out: Path, silos: Sequence[Silo], *, source: dict[str, object]) -> Path:
    """Write every silo and the manifest under `out`; return the manifest path."""
    out.mkdir(parents=True, exist_ok=True)
    for silo in silos:
        directory = out / silo.user
        directory.mkdir(exist_ok=True)
        _write_atomic(directory / "train.jsonl", _jsonl(silo.train))
        _write_atomic(directory / "eval.jsonl", _jsonl(silo.eval))
    manifest = {
        **source,
        "users": {
            s.user: {"speakers": list(s.speakers), "train": len(s.train), "eval": len(s.eval)}
            for s in silos
        },
    }
    path = out / MANIFEST
    _write_atomic(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def convert(
    corpus: Path, out: Path, *, users: int, eval_fraction: float = 0.15, min_turns: int = 10
) -> list[Silo]:
    """Read `corpus`, build the silos and write them under `out`."""
    try:
        raw = corpus.read_bytes()
        text = raw.decode("utf-8")
    except FileNotFoundError as e:
        raise DataError(f"{corpus}: not found (give --corpus the path of a text file)") from e
    except IsADirectoryError as e:
        raise DataError(f"{corpus}: is a directory (give --corpus a text file)") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{corpus}: cannot read the corpus as UTF-8 text: {e}") from e
    try:
        blocks = parse_blocks(text)
    except DataError as e:
        raise DataError(f"{corpus}: {e}") from e
    silos = build_silos(blocks, users=users, eval_fraction=eval_fraction, min_turns=min_turns)
    source = {
        "corpus": str(corpus),
        "corpus_sha256": hashlib.sha256(raw).hexdigest(),
        "eval_fraction": eval_fraction,
        "min_turns": min_turns,
        "format": "LEAF-style: user = previous block, assistant = the speaker's block",
    }
    write_silos(out, silos, source=source)
    return silos


class _DeprecatedUsers(argparse.Action):
    """`--users N`: the old name of `--speakers N`, still accepted with a warning."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        log.warning("--users is deprecated here: use --speakers %s", values)
        setattr(namespace, self.dest, values)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", type=Path, required=True, help="tinyshakespeare-format text")
    parser.add_argument(
        "--home",
        type=Path,
        default=None,
        help="fedpersona home (default: $FEDPERSONA_HOME or ./.fedpersona)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="silo directory (default: HOME/silos)"
    )
    parser.add_argument(
        "--speakers",
        type=int,
        default=10,
        help="how many speakers to keep, one user silo each (most turns first)",
    )
    # Deprecated: `--users` is a comma list of user ids everywhere else (`train --users a,b`).
    parser.add_argument(
        "--users", type=int, dest="speakers", action=_DeprecatedUsers, help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--eval-fraction",
        type=float,
        default=0.15,
        help="last fraction of each speaker's turns held out for evaluation",
    )
    parser.add_argument(
        "--min-turns", type=int, default=10, help="ignore speakers with fewer turns"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    from fedpersona.trainer.commands.models import resolve_home
    from rich.console import Console
    from rich.table import Table

    out = args.out if args.out is not None else resolve_home(args.home) / "silos"
    try:
        silos = convert(
            args.corpus,
            out,
            users=args.speakers,
            eval_fraction=args.eval_fraction,
            min_turns=args.min_turns,
        )
    except DataError as e:
        log.error("cannot convert the corpus: %s", e)
        return 2
    summary = {s.user: {"train": len(s.train), "eval": len(s.eval)} for s in silos}
    if args.json:
        print(json.dumps({"out": str(out), "users": summary}, indent=2))
        return 0
    table = Table(title=f"{len(silos)} Shakespeare silos in {out}")
    for column in ("user", "speaker", "train chats", "eval chats"):
        table.add_column(column)
    for s in silos:
        table.add_row(s.user, ", ".join(s.speakers), str(len(s.train)), str(len(s.eval)))
    Console().print(table)
    log.info("wrote %d silos and %s", len(silos), out / MANIFEST)
    return 0
