"""The vLLM launch builder and `fedpersona engine`: the exact command line and environment."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from fedpersona.adapters import (
    EXPERT_MAX_RANK,
    MAX_LORA_RANK,
    AdapterStore,
    Home,
    InvalidManifest,
    RankLimitMismatch,
    resolve_home,
)
from fedpersona.service.commands import engine as engine_cmd
from fedpersona.service.commands.engine import EngineProcessSettings
from fedpersona.service.engine.config import EngineSettings, build_launch, engine_argv
from fedpersona.service.settings import Settings
from pydantic import ValidationError


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    model = tmp_path / "models" / "large"
    model.mkdir(parents=True)
    (model / "fedpersona.json").write_text(json.dumps({"name": "fedpersona-tiny-large"}))
    return tmp_path


def test_argv_has_every_flag_vllm_needs(home: Path) -> None:
    settings = EngineSettings(port=9123, max_loras=2, max_cpu_loras=4, max_lora_rank=32)
    launch = build_launch(settings, home=home, python="/venv/bin/python")
    argv = launch.argv
    assert argv[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert flag(argv, "--model") == str((home / "models" / "large").resolve())
    assert flag(argv, "--served-model-name") == "fedpersona-tiny-large"
    assert "--enable-lora" in argv
    assert flag(argv, "--max-loras") == "2"
    assert flag(argv, "--max-cpu-loras") == "4"
    assert flag(argv, "--max-lora-rank") == "32"
    assert flag(argv, "--max-model-len") == "1024"
    assert flag(argv, "--dtype") == "float32"
    assert (flag(argv, "--host"), flag(argv, "--port")) == ("127.0.0.1", "9123")
    assert "--logits-processors" not in argv
    assert launch.base_url == "http://127.0.0.1:9123"
    assert launch.served_model_name == "fedpersona-tiny-large"


def test_env_enables_runtime_lora_and_disables_resolver_plugins(home: Path) -> None:
    launch = build_launch(EngineSettings(kv_cache_gib=3), home=home)
    assert launch.env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert launch.env["VLLM_CPU_KVCACHE_SPACE"] == "3"
    assert launch.env["HF_HUB_OFFLINE"] == "1" and launch.env["TRANSFORMERS_OFFLINE"] == "1"
    # An allow-list naming nothing: vLLM loads no general plugin, so the filesystem and HF
    # resolvers (which turn a client's model name into a path) are never registered.
    assert launch.env["VLLM_PLUGINS"] == ""
    parent = {
        "PATH": "/bin",
        "VLLM_LORA_RESOLVER_CACHE_DIR": "/",
        "VLLM_LORA_RESOLVER_HF_REPO_LIST": "x/y",
        "VLLM_PLUGINS": "lora_filesystem_resolver",
    }
    env = launch.environ(parent)
    assert "VLLM_LORA_RESOLVER_CACHE_DIR" not in env
    assert "VLLM_LORA_RESOLVER_HF_REPO_LIST" not in env
    assert env["VLLM_PLUGINS"] == "" and env["PATH"] == "/bin"


def test_proxy_small_model_adds_logits_processor_and_env(home: Path) -> None:
    settings = EngineSettings(proxy_small_model=home / "models" / "small")
    launch = build_launch(settings, home=home, store_dir=home / "elsewhere")
    assert (
        flag(launch.argv, "--logits-processors")
        == "fedpersona.service.proxy_tuning.processor:ProxyTuningLogitsProcessor"
    )
    assert launch.env["FEDPERSONA_PROXY_SMALL_MODEL"] == str(home / "models" / "small")
    assert launch.env["FEDPERSONA_STORE_DIR"] == str((home / "elsewhere").resolve())
    assert "FEDPERSONA_STORE" not in launch.env


def test_explicit_name_and_extra_args(home: Path) -> None:
    settings = EngineSettings(served_model_name="big", extra_args=["--max-num-seqs", "8"])
    argv = engine_argv(settings, model_dir=home, served_model_name="big", python="py")
    assert flag(argv, "--served-model-name") == "big"
    assert argv[-2:] == ["--max-num-seqs", "8"]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_lora_rank", 12, "max_lora_rank must be one of"),
        ("extra_args", ["--port=1"], "extra_args may not set --port"),
        ("extra_args", ["--enable-lora"], "may not set --enable-lora"),
        ("proxy_processor", "no_colon", "module:Class"),
        ("max_loras", 0, "greater than or equal to 1"),
    ],
)
def test_invalid_settings_are_refused(field: str, value: object, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        EngineSettings.model_validate({field: value})


def test_cpu_cache_must_hold_the_slots() -> None:
    with pytest.raises(ValidationError, match="max_cpu_loras must be >= max_loras"):
        EngineSettings(max_loras=8, max_cpu_loras=4)


def test_external_url_means_not_supervised() -> None:
    assert EngineSettings().supervised
    settings = EngineSettings(url="http://vllm:8000/")
    assert not settings.supervised and settings.base_url == "http://vllm:8000"
    assert EngineSettings(host="0.0.0.0", port=81).base_url == "http://127.0.0.1:81"


def test_launch_needs_a_model_manifest_or_an_explicit_name(tmp_path: Path) -> None:
    """One behaviour for every engine: no fallback to the directory's name."""
    model = tmp_path / "models" / "large"
    model.mkdir(parents=True)
    with pytest.raises(InvalidManifest, match=r"fedpersona\.json is missing"):
        build_launch(EngineSettings(), home=tmp_path)
    (model / "fedpersona.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"fedpersona\.json: not valid JSON"):
        build_launch(EngineSettings(), home=tmp_path)
    (model / "fedpersona.json").write_text(json.dumps({"name": ""}))
    with pytest.raises(InvalidManifest, match="field 'name'"):
        build_launch(EngineSettings(), home=tmp_path)
    launch = build_launch(EngineSettings(served_model_name="named"), home=tmp_path)
    assert launch.served_model_name == "named"


def test_store_rank_limit_above_the_engine_flag_is_refused_at_start_up(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    assert settings.adapter_max_rank == settings.engine.max_lora_rank == 16
    Settings(home=tmp_path, adapter_max_rank=8)  # stricter than the engine: fine
    Settings(home=tmp_path, adapter_max_rank=32, engine={"max_lora_rank": 32})
    with pytest.raises(ValidationError, match=r"up to 32 .* --max-lora-rank 16") as caught:
        Settings(home=tmp_path, adapter_max_rank=32)
    assert isinstance(caught.value.errors()[0]["ctx"]["error"], RankLimitMismatch)


def test_engine_rank_env_is_cross_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDPERSONA_ENGINE__MAX_LORA_RANK", "8")
    with pytest.raises(ValidationError, match=r"up to 16 .* --max-lora-rank 8"):
        Settings(home=tmp_path)
    monkeypatch.setenv("FEDPERSONA_ADAPTER_MAX_RANK", "8")
    assert Settings(home=tmp_path).engine.max_lora_rank == 8


def test_engine_command_prints_the_launch(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FEDPERSONA_ENGINE__MAX_LORAS", "3")
    monkeypatch.setenv("FEDPERSONA_ENGINE__MAX_CPU_LORAS", "9")
    parser = argparse.ArgumentParser()
    engine_cmd.add_arguments(parser)
    args = parser.parse_args(["--home", str(home), "--host", "0.0.0.0", "--port", "8001", "--json"])
    assert engine_cmd.run(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert flag(out["argv"], "--max-loras") == "3"
    assert flag(out["argv"], "--max-cpu-loras") == "9"
    assert (flag(out["argv"], "--host"), flag(out["argv"], "--port")) == ("0.0.0.0", "8001")
    assert out["env"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"

    args = parser.parse_args(["--home", str(home)])
    engine_cmd.run(args)
    line = capsys.readouterr().out
    assert (
        line.startswith("HF_HUB_OFFLINE=1 ") and "--served-model-name fedpersona-tiny-large" in line
    )


def test_engine_command_refuses_bad_override(home: Path) -> None:
    parser = argparse.ArgumentParser()
    engine_cmd.add_arguments(parser)
    with pytest.raises(ValidationError):
        engine_cmd.run(parser.parse_args(["--home", str(home), "--port", "0"]))


def test_engine_command_exec_replaces_the_process_with_vllm(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, list[str], dict[str, str]]] = []
    monkeypatch.setattr(engine_cmd.os, "execvpe", lambda f, a, e: calls.append((f, a, e)))
    monkeypatch.setenv("VLLM_LORA_RESOLVER_CACHE_DIR", "/")
    parser = argparse.ArgumentParser()
    engine_cmd.add_arguments(parser)
    # Without the shared secret a separately run engine would be open: refused.
    assert engine_cmd.run(parser.parse_args(["--home", str(home), "--exec"])) == 2
    assert calls == []
    monkeypatch.setenv("FEDPERSONA_ENGINE__API_KEY", "engine-secret-0123456789")
    engine_cmd.run(parser.parse_args(["--home", str(home), "--exec"]))
    [(file, argv, env)] = calls
    assert file == argv[0] and argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert "VLLM_LORA_RESOLVER_CACHE_DIR" not in env
    assert env["VLLM_API_KEY"] == "engine-secret-0123456789"
    assert "engine-secret" not in " ".join(argv)  # never on a command line
    assert flag(argv, "--middleware") == "fedpersona.service.engine.guard.EngineKeyGuard"


def test_engine_key_is_generated_per_launch_and_never_printed(
    home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = build_launch(EngineSettings(), home=home)
    second = build_launch(EngineSettings(), home=home)
    assert len(first.api_key) >= 40 and first.api_key != second.api_key
    assert first.api_key not in first.shell() and first.api_key not in repr(first)
    fixed = build_launch(EngineSettings(api_key="configured-key-0123456789"), home=home)
    assert fixed.api_key == "configured-key-0123456789"
    monkeypatch.setenv("FEDPERSONA_ENGINE__API_KEY", "configured-key-0123456789")
    parser = argparse.ArgumentParser()
    engine_cmd.add_arguments(parser)
    engine_cmd.run(parser.parse_args(["--home", str(home), "--json"]))
    engine_cmd.run(parser.parse_args(["--home", str(home)]))
    assert "configured-key" not in capsys.readouterr().out


def test_an_external_engine_needs_its_key_in_production(tmp_path: Path) -> None:
    production = {"environment": "production", "admin_key": "a" * 8 + "-long-admin-key-0123"}
    with pytest.raises(ValidationError, match=r"engine\.api_key"):
        Settings(home=tmp_path, engine={"url": "http://vllm:8000"}, **production)
    settings = Settings(
        home=tmp_path, engine={"url": "http://vllm:8000", "api_key": "k" * 32}, **production
    )
    assert settings.engine_key == "k" * 32
    Settings(home=tmp_path, **production)  # embedded: the key is generated per start


def test_every_settings_class_reads_the_same_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDPERSONA_HOME", str(tmp_path))
    assert Settings().home == EngineProcessSettings().home == resolve_home() == tmp_path
    assert Settings().store_path == Home(tmp_path).store
    assert Settings(home=tmp_path / "x").registry_file == Home(tmp_path / "x").registry
    monkeypatch.delenv("FEDPERSONA_HOME")
    monkeypatch.setenv("HOME", "/not/this")  # the alias is FEDPERSONA_HOME, never $HOME
    assert Settings().home == Path(".fedpersona")


def test_the_default_deployment_uses_one_rank_limit() -> None:
    from fedpersona.service.proxy_tuning.settings import ProxySettings

    assert AdapterStore.__init__.__kwdefaults__["max_rank"] == MAX_LORA_RANK
    assert EngineSettings().max_lora_rank == Settings().adapter_max_rank == MAX_LORA_RANK
    fields = ProxySettings.model_fields
    assert fields["proxy_max_rank"].default == EXPERT_MAX_RANK


def test_proxy_store_dir_and_its_deprecated_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedpersona.service.proxy_tuning.settings import ProxySettings

    monkeypatch.setenv("FEDPERSONA_PROXY_SMALL_MODEL", str(tmp_path / "small"))
    monkeypatch.setenv("FEDPERSONA_STORE", str(tmp_path / "old"))
    assert ProxySettings().store_dir == tmp_path / "old"  # type: ignore[call-arg]
    monkeypatch.setenv("FEDPERSONA_STORE_DIR", str(tmp_path / "new"))
    assert ProxySettings().store_dir == tmp_path / "new"  # type: ignore[call-arg]


def test_lora_slots_default_to_16_or_the_cpu_cache_if_smaller(home: Path) -> None:
    assert EngineSettings().max_loras == 16
    assert EngineSettings(max_cpu_loras=4).max_loras == 4  # a small cache alone still starts
    assert EngineSettings(max_loras=2, max_cpu_loras=4).max_loras == 2
    launch = build_launch(EngineSettings(), home=home, python="/venv/bin/python")
    assert flag(launch.argv, "--max-loras") == "16"
