"""A second heterogeneous population built offline: Python standard-library packages as users.

Each user is one package of the standard library of the running interpreter (`asyncio`,
`email`, `json`, ...). A chat asks what one of its public functions, classes or methods does
and the assistant answers with the first paragraph of its docstring, so each user has their own
vocabulary, topics and style (compare `email`'s MIME prose with `unittest`'s assertions).
Licence of the text: the Python Software Foundation License, version 2 (the docstrings are
part of CPython; `sys.version` of the interpreter is recorded in the manifest).

Split: an object whose stable hash (sha256 of its qualified name) falls in the lowest
`held_out` fraction is held out (`eval.jsonl`), the rest is `train.jsonl`, in a deterministic
order. A docstring that occurs under two users (re-exports, inherited docs) is dropped from
every user, so no user's text is in another's silo (`shared_replies` checks it). This module
imports the standard-library packages it reads (no network, no model) and writes only with
`write_silos`.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import logging
import pkgutil
import sys
from collections import defaultdict
from pathlib import Path
from types import ModuleType

from fedpersona.trainer.errors import DataError

log = logging.getLogger(__name__)

Chat = dict[str, list[dict[str, str]]]

PACKAGES: tuple[str, ...] = (
    "email",
    "unittest",
    "asyncio",
    "xml",
    "http",
    "logging",
    "importlib",
    "urllib",
)
MANIFEST = "pydocs.json"
MIN_CHARS = 40
MAX_CHARS = 400


def _paragraph(doc: str | None) -> str | None:
    if not doc:
        return None
    text = inspect.cleandoc(doc).split("\n\n", 1)[0].strip()
    text = " ".join(text.split())
    if len(text) < MIN_CHARS:
        return None
    return text[:MAX_CHARS]


def _modules(package: str) -> list[ModuleType]:
    root = importlib.import_module(package)
    found = [root]
    for info in pkgutil.walk_packages(getattr(root, "__path__", []), prefix=f"{package}."):
        if any(part.startswith("_") or part in {"test", "tests"} for part in info.name.split(".")):
            continue
        try:
            found.append(importlib.import_module(info.name))
        except Exception as e:  # a platform-only module (e.g. asyncio.windows_events)
            log.debug("skipping %s: %s", info.name, e)
    return found


def documented(package: str) -> dict[str, str]:
    """Qualified name -> first docstring paragraph of the public objects defined in `package`."""
    out: dict[str, str] = {}
    for module in _modules(package):
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            qualname = f"{module.__name__}.{name}"
            if (text := _paragraph(obj.__doc__)) is not None:
                out[qualname] = text
            if inspect.isclass(obj):
                for attr, member in sorted(vars(obj).items()):
                    if attr.startswith("_") or not inspect.isfunction(member):
                        continue
                    if (text := _paragraph(member.__doc__)) is not None:
                        out[f"{qualname}.{attr}"] = text
    return out


def _chat(qualname: str, reply: str) -> dict[str, list[dict[str, str]]]:
    return {
        "messages": [
            {"role": "user", "content": f"What does `{qualname}` do?"},
            {"role": "assistant", "content": reply},
        ]
    }


def _held_out(qualname: str, fraction: float) -> bool:
    digest = hashlib.sha256(qualname.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def build(
    packages: tuple[str, ...] = PACKAGES, *, held_out: float = 0.15, max_train: int = 160
) -> dict[str, dict[str, list[dict[str, list[dict[str, str]]]]]]:
    """user -> {"train": chats, "eval": chats}; docstrings shared by two users are dropped."""
    docs = {package: documented(package) for package in packages}
    owners: dict[str, set[str]] = defaultdict(set)
    for package, entries in docs.items():
        for text in entries.values():
            owners[text].add(package)
    out = {}
    for package, entries in docs.items():
        train: list[Chat] = []
        evaluation: list[Chat] = []
        for qualname in sorted(entries, key=lambda q: hashlib.sha256(q.encode()).hexdigest()):
            text = entries[qualname]
            if len(owners[text]) > 1:
                continue
            (evaluation if _held_out(qualname, held_out) else train).append(_chat(qualname, text))
        if not train or not evaluation:
            raise DataError(f"package {package!r} has too few documented objects")
        out[package] = {"train": train[:max_train], "eval": evaluation[: max(1, max_train // 5)]}
    return out


def shared_replies(silos: dict[str, dict[str, list[dict[str, list[dict[str, str]]]]]]) -> set[str]:
    """Replies found in more than one user's silo (must be empty)."""
    seen: dict[str, set[str]] = defaultdict(set)
    for user, splits in silos.items():
        for chats in splits.values():
            for chat in chats:
                seen[chat["messages"][-1]["content"]].add(user)
    return {text for text, users in seen.items() if len(users) > 1}


def write_silos(
    out: Path, *, packages: tuple[str, ...] = PACKAGES, max_train: int = 160
) -> dict[str, Path]:
    """Write `out/<package>/{train,eval}.jsonl` and `out/pydocs.json`; user -> silo dir."""
    silos = build(packages, max_train=max_train)
    if shared := shared_replies(silos):
        raise DataError(f"{len(shared)} replies appear in two users' silos")
    result = {}
    for user, splits in silos.items():
        silo = Path(out) / user
        silo.mkdir(parents=True, exist_ok=True)
        for split, chats in splits.items():
            lines = "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in chats)
            (silo / f"{split}.jsonl").write_text(lines, encoding="utf-8")
        result[user] = silo
    manifest = {
        "source": "docstrings of the Python standard library",
        "licence": "Python Software Foundation License Version 2",
        "python": sys.version,
        "users": {u: {k: len(v) for k, v in s.items()} for u, s in silos.items()},
    }
    (Path(out) / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return result
