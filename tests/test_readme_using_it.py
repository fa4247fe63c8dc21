"""The README's "Using it" section, walked as written on the micro model.

Every `fedpersona` line of its shell block must parse with today's CLI. The fast test then runs
the steps that need neither Flower nor vLLM for real (`models bootstrap --recipe micro`,
`data shakespeare`, `users add`), checks the engine command follows the model (the micro
model's 512 positions, not a default vLLM refuses), and that `serve` gets as far as its
pre-flight; the `train` step runs for real under the `flower` mark (shortened to one round).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from fedpersona.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def using_it_commands() -> list[list[str]]:
    """The `fedpersona ...` lines of the first shell block under "## Using it", as argv."""
    section = ROOT.joinpath("README.md").read_text().split("## Using it", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README's Using it section has no bash block"
    commands = []
    for line in block.group(1).splitlines():
        words = shlex.split(line, comments=True)
        while words and "=" in words[0] and not words[0].startswith("-"):
            words = words[1:]  # VAR=value prefixes
        if words and words[0] == "fedpersona":
            commands.append(words[1:])
    return commands


def _step(name: str) -> list[str]:
    return next(c for c in using_it_commands() if c[: len(name.split())] == name.split())


def test_every_step_parses() -> None:
    commands = using_it_commands()
    assert [c[0] for c in commands] == ["models", "models", "data", "train", "users", "serve"]
    parser = build_parser()
    for argv in commands:
        parser.parse_args(argv)  # SystemExit(2) on any flag the CLI no longer knows


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("readme") / ".fedpersona"


def _run(argv: list[str], home: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setenv("FEDPERSONA_HOME", str(home))
    return main(argv)


def _corpus(tmp: Path) -> Path:
    """The README's corpus when `../shared/data/` is there, else a small one in its format (the
    suite must pass without the shared data)."""
    if CORPUS.is_file():
        return CORPUS
    speakers = ("FIRST CITIZEN", "SECOND CITIZEN", "MENENIUS")
    blocks = [
        f"{speakers[i % 3]}:\nI speak the {i}th time of bread, of corn and of the senate.\n"
        f"Hear me, for the {i}th reason is the best of all."
        for i in range(90)
    ]
    path = tmp / "tinyshakespeare-like.txt"
    path.write_text("\n\n".join(blocks) + "\n")
    return path


def test_walk_without_flower_or_vllm(
    home: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    assert _run([*_step("models bootstrap"), "--recipe", "micro"], home, monkeypatch) == 0
    data = _step("data shakespeare")
    data[data.index("--corpus") + 1] = str(_corpus(tmp_path))
    data[data.index("--speakers") + 1] = "2"  # the micro walk keeps it small
    assert _run(data, home, monkeypatch) == 0
    assert len([p for p in (home / "silos").iterdir() if p.is_dir()]) == 2
    capsys.readouterr()
    assert _run(_step("users add"), home, monkeypatch) == 0
    assert "fp-" in capsys.readouterr().out  # the key, printed once
    assert _run(["engine", "--json"], home, monkeypatch) == 0
    argv = json.loads(capsys.readouterr().out)["argv"]
    assert argv[argv.index("--max-model-len") + 1] == "512"  # the model's own limit


@pytest.mark.flower
@pytest.mark.slow
def test_walk_train_step(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not (home / "silos").is_dir():
        pytest.fail("run with test_walk_without_flower_or_vllm first (same module)")
    train = _step("train")
    train[train.index("--rounds") + 1] = "1"
    assert _run([*train, "--local-steps", "1", "--max-len", "32"], home, monkeypatch) == 0
    assert any((home / "store").rglob("adapter_config.json"))
