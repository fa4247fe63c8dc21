"""The operator's first mistakes end in one line that says what to do (and the right exit code).

`fedpersona serve` refuses a home without a model and an engine port held by another process
before vLLM starts, and ends (exit 1, cause and fix) when vLLM cannot start instead of answering
503 forever; `fedpersona train` refuses a missing base model and bad silo lines before Flower and
Ray start. The failing vLLM is a stand-in `vllm` package first on the child's PYTHONPATH, so
the real supervisor, launch and uvicorn run; the real-vLLM case lives in `tests/integration/`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fedpersona.service.commands.serve import engine_fix
from fedpersona.service.engine.config import EngineLaunch
from fedpersona.service.engine.supervisor import EngineState, EngineSupervisor, port_in_use
from fedpersona.trainer.data.validation import check_silos

from fedpersona.cli import main

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
DERIVED = (
    "ValueError: User-specified max_model_len (4096) is greater than the derived max_model_len "
    "(max_position_embeddings=512 or model_max_length=None in model's config.json)."
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _silo(root: Path, user: str, lines: list[str]) -> None:
    silo = root / "silos" / user
    silo.mkdir(parents=True)
    (silo / "train.jsonl").write_text("\n".join(lines) + "\n")
    (silo / "eval.jsonl").write_text(json.dumps(CHAT) + "\n")


def test_serve_without_a_model_says_bootstrap(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    rc = main(["serve", "--home", str(tmp_path), "--port", str(_free_port()), "--no-rounds"])
    assert rc == 2
    assert "run `fedpersona models bootstrap`" in caplog.text
    assert not (tmp_path / "logs").exists()  # vLLM never started


def test_serve_refuses_a_taken_engine_port(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDPERSONA_ENGINE__SERVED_MODEL_NAME", "m")  # no model needed
    caplog.set_level(logging.ERROR)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert port_in_use("127.0.0.1", port)
        rc = main(["serve", "--home", str(tmp_path), "--engine-port", str(port), "--no-rounds"])
    assert rc == 2
    assert f"127.0.0.1:{port} is in use" in caplog.text and "--engine-port N" in caplog.text
    assert not port_in_use("127.0.0.1", port)


def test_engine_port_flag_reaches_the_launch(tmp_path: Path) -> None:
    from fedpersona.service.commands.serve import build_settings

    from fedpersona.cli import build_parser

    args = build_parser().parse_args(["serve", "--engine-port", "18123"])
    assert build_settings(args).engine.port == 18123
    with pytest.raises(ValueError, match="port"):
        build_settings(build_parser().parse_args(["serve", "--engine-port", "70000"]))


def test_supervisor_fails_at_once_on_a_taken_port(tmp_path: Path) -> None:
    async def scenario() -> tuple[EngineState, str | None, list[str]]:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            launch = EngineLaunch(
                argv=[sys.executable, "-c", "raise SystemExit(3)", "--port", str(port)],
                env={},
                base_url=f"http://127.0.0.1:{port}",
                served_model_name="m",
            )
            told: list[str] = []
            sup = EngineSupervisor(launch, log_path=tmp_path / "vllm.log")
            sup.on_failure(told.append)
            await sup.start()
            with pytest.raises(Exception, match="already in use"):
                await sup.wait_ready(5)
            state, failure = sup.state, sup.failure
            await sup.stop()
            return state, failure, told

    state, failure, told = asyncio.run(scenario())
    assert state is EngineState.FAILED and told == [failure]
    assert not (tmp_path / "vllm.log").exists()  # nothing was spawned


def test_engine_fix_names_the_setting() -> None:
    assert "FEDPERSONA_ENGINE__MAX_MODEL_LEN" in engine_fix(DERIVED)
    assert "VLLM_ALLOW_LONG_MAX_MODEL_LEN" not in engine_fix(DERIVED)
    assert "--engine-port" in engine_fix("OSError: [Errno 98] Address already in use")
    assert "fedpersona engine" in engine_fix("something new")


def test_serve_ends_when_the_engine_cannot_start(tmp_path: Path) -> None:
    fake = tmp_path / "fake"
    package = fake / "vllm" / "entrypoints" / "openai"
    package.mkdir(parents=True)
    for folder in (fake / "vllm", fake / "vllm" / "entrypoints", package):
        (folder / "__init__.py").write_text("")
    (package / "api_server.py").write_text(f"import sys\nprint({DERIVED!r})\nsys.exit(1)\n")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")]),
        "FEDPERSONA_ENGINE__SERVED_MODEL_NAME": "m",
        "FEDPERSONA_ENGINE__MAX_MODEL_LEN": "4096",
    }
    home = tmp_path / "home"
    argv = ["serve", "--home", str(home), "--port", str(_free_port()), "--no-rounds"]
    argv += ["--engine-port", str(_free_port())]
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "fedpersona.cli", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 1, done.stderr
    assert time.monotonic() - started < 60
    assert "is greater than the derived max_model_len" in done.stderr  # the cause
    assert "Fix: set FEDPERSONA_ENGINE__MAX_MODEL_LEN" in done.stderr  # and the fix


def test_train_without_a_model_says_bootstrap(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _silo(tmp_path, "alice", [json.dumps(CHAT)])
    caplog.set_level(logging.ERROR)
    assert main(["train", "--home", str(tmp_path), "--rounds", "1"]) == 2
    assert "run `fedpersona models bootstrap`" in caplog.text
    assert not list((tmp_path / "runs").glob("*.json"))  # refused before any run began


def test_train_lists_every_bad_silo_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "models" / "large").mkdir(parents=True)
    (tmp_path / "models" / "large" / "config.json").write_text("{}")
    _silo(tmp_path, "alice", [json.dumps(CHAT)])
    _silo(tmp_path, "bob", [json.dumps(CHAT), '{"messages": [}'])
    _silo(tmp_path, "carol", [json.dumps({"messages": [{"role": "user", "content": "x"}]})])
    caplog.set_level(logging.ERROR)
    assert main(["train", "--home", str(tmp_path), "--rounds", "1"]) == 2
    bob = tmp_path / "silos" / "bob" / "train.jsonl"
    carol = tmp_path / "silos" / "carol" / "train.jsonl"
    assert f"{bob}:2: not valid JSON" in caplog.text
    assert f"{carol}:1: the chat has no assistant turn" in caplog.text
    assert "nothing was trained" in caplog.text
    assert not list((tmp_path / "runs").glob("*.json"))  # no run record was written


def test_check_silos_reports_empty_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "train.jsonl").write_text("\n")
    problems = check_silos({"a": tmp_path / "a"})
    assert problems == [
        f"{tmp_path / 'a' / 'train.jsonl'}: no chat (user a has nothing to train on)",
        f"{tmp_path / 'a' / 'eval.jsonl'}: missing (a silo needs train.jsonl and eval.jsonl)",
    ]


def test_a_missing_corpus_is_not_found(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.ERROR)
    missing = tmp_path / "nope.txt"
    argv = ["data", "shakespeare", "--corpus", str(missing), "--home", str(tmp_path)]
    assert main(argv) == 2
    assert f"{missing}: not found" in caplog.text and "Errno" not in caplog.text
    argv = ["models", "bootstrap", "--recipe", "micro", "--corpus", str(missing)]
    assert main([*argv, "--home", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"--corpus {missing}: not found" in err.replace("\n", "")


def test_users_against_an_unreachable_database_is_one_line_not_a_traceback(
    tmp_path: Path,
) -> None:
    env = {
        **os.environ,
        "FEDPERSONA_HOME": str(tmp_path),
        "FEDPERSONA_DATABASE_URL": f"postgresql://fp:hunter2@127.0.0.1:{_free_port()}/fp",
    }
    done = subprocess.run(
        [sys.executable, "-m", "fedpersona", "users", "list"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "cannot connect to PostgreSQL" in done.stderr
    assert "Traceback" not in done.stderr and "hunter2" not in done.stderr + done.stdout
    assert not (tmp_path / "registry.sqlite").exists()  # no silent fallback to SQLite
