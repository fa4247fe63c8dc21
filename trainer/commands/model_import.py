"""`fedpersona models import SOURCE`: a GGUF file or a Hugging Face directory -> a served model.

    fedpersona models import model.gguf [--role large|small] [--name NAME] [--license L]

Writes `<home>/models/<role>` (or `--out DIR`) with a manifest (`fedpersona.json`: name,
architecture, parameters, tokenizer, source and its sha256, licence, engine hints); a second
import of the same source is a cache hit. A corrupt or truncated file, an architecture other
than Llama, or a small model whose tokenizer differs from the home's large model is refused with
one line that says what is wrong, and nothing is written. The real work is in
`fedpersona.trainer.models.importer`; torch loads only when the command runs.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from fedpersona.adapters.home import resolve_home

_NAME_RE = re.compile(r"[^A-Za-z0-9._-]+")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path, help="a .gguf file or a Hugging Face model directory")
    parser.add_argument(
        "--home",
        type=Path,
        default=None,
        help="fedpersona home (default: $FEDPERSONA_HOME or ./.fedpersona)",
    )
    parser.add_argument(
        "--role",
        choices=("large", "small"),
        default="large",
        help="large: served by vLLM; small: FedPT proxy (default: large)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="target directory (default: <home>/models/<role>)"
    )
    parser.add_argument(
        "--name", default=None, help="served model name (default: from the source's file/dir name)"
    )
    parser.add_argument("--license", default=None, help="licence to record (GGUF: read from it)")
    parser.add_argument("--sha256", default=None, help="refuse the source unless it hashes to this")
    parser.add_argument("--force", action="store_true", help="import again even on a cache hit")
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON")


def default_name(source: Path) -> str:
    stem = source.stem if source.is_file() else source.name
    return _NAME_RE.sub("-", stem).strip("-").lower() or "model"


def run(args: argparse.Namespace) -> int:
    from fedpersona.trainer.errors import ModelImportError
    from fedpersona.trainer.models.importer import import_model
    from fedpersona.trainer.models.proxy import same_tokenizer
    from rich.console import Console

    console = Console(stderr=True)
    home = resolve_home(args.home)
    target = args.out or home / "models" / args.role
    large_dir = home / "models" / "large"
    try:
        if args.role == "small" and not args.source.is_dir():
            raise ModelImportError("a small (proxy) model must be a Hugging Face directory")
        if (
            args.role == "small"
            and (large_dir / "tokenizer.json").is_file()
            and not same_tokenizer(args.source, large_dir)
        ):
            raise ModelImportError(
                f"the tokenizer of {args.source} differs from the large model's ({large_dir}): "
                "FedPT needs the small and the large model to share one vocabulary"
            )
        result = import_model(
            args.source,
            target,
            name=args.name or default_name(args.source),
            role=args.role,
            license=args.license,
            expected_sha256=args.sha256,
            force=args.force,
            progress=None if args.json else (lambda msg: console.print(f"[dim]{msg}")),
        )
    except ModelImportError as e:
        console.print(f"[red]cannot import {args.source}: {e}", soft_wrap=True)
        return 2
    if args.json:
        print(
            json.dumps(
                {
                    "path": str(result.path),
                    "cache_hit": result.cache_hit,
                    "seconds": round(result.seconds, 2),
                    "manifest": result.manifest.to_json(),
                },
                indent=2,
            )
        )
        return 0
    what = "already imported" if result.cache_hit else f"imported in {result.seconds:.1f} s"
    m = result.manifest
    console.print(
        f"{m.name} ({m.architecture}, {m.num_parameters or 0:,} parameters): "
        f"{what} -> {result.path}",
        soft_wrap=True,
    )
    return 0
