"""The chart's containers run the project's real commands, checked by running them as plain
processes here (there is no container runtime): the vLLM flags are exactly what
`fedpersona engine` builds, the gateway's environment is read by the real `Settings`, every
`fedpersona` command line parses with the real CLI, the Dockerfiles' entry points agree, and the
round-schedule job and the model-init step do what they say."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from fedpersona.service.engine.config import EngineSettings
from fedpersona.service.settings import Settings
from helmchart import EXAMPLES, REPO, Rendered, env_map, render

pytestmark = pytest.mark.helm

FEDPERSONA = Path(sys.executable).parent / "fedpersona"
ADMIN_KEY = "k" * 32
ENGINE_KEY = "e" * 32

ENGINE_CASES: list[tuple[str, list[Path], dict[str, Any] | None]] = [
    ("defaults", [], None),
    *[(f.stem, [f], None) for f in EXAMPLES if "external" not in f.name],
    (
        "proxy-tp2-extra",
        [],
        {
            "proxyTuning": {"enabled": True},
            "vllm": {"gpus": 2, "extraArgs": ["--enable-prefix-caching", "--seed=3"]},
        },
    ),
]
CASE_IDS = [c[0] for c in ENGINE_CASES]


def plain_env(container: dict[str, Any], **extra: str) -> dict[str, str]:
    """The process environment for running a container's command here: this machine's env
    without any FEDPERSONA_ variable, plus the container's literal values and `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDPERSONA_")}
    env.update({k: v for k, v in env_map(container).items() if isinstance(v, str)})
    env.update(extra)
    return env


def fedpersona(args: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(
        [str(FEDPERSONA), *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"fedpersona {' '.join(args)} failed:\n{proc.stderr}"
    return proc.stdout


# ---- vLLM: the chart's command is `fedpersona engine`'s command ------------------------------


def _engine_launch(container: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    """What `fedpersona engine` builds in a process with this container's environment."""
    from fedpersona.service.commands import engine as engine_cmd

    for key in list(os.environ):
        if key.startswith("FEDPERSONA_"):
            monkeypatch.delenv(key)
    for key, value in plain_env(container).items():
        if key.startswith("FEDPERSONA_"):
            monkeypatch.setenv(key, value)
    parser = argparse.ArgumentParser()
    engine_cmd.add_arguments(parser)
    return engine_cmd.launch_from_args(parser.parse_args(["--json"]))


@pytest.mark.parametrize(("name", "files", "values"), ENGINE_CASES, ids=CASE_IDS)
def test_vllm_container_runs_what_the_engine_launcher_builds(
    helm_bin: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    files: list[Path],
    values: dict[str, Any] | None,
) -> None:
    container = render(helm_bin, files=files, values=values).container("vllm")
    launch = _engine_launch(container, monkeypatch)
    # Same module, same flags, same order (argv[0] is this machine's python).
    assert launch.argv[1:] == container["command"][1:] + container["args"]
    env = env_map(container)
    for key, value in launch.env.items():
        if key == "VLLM_API_KEY":
            continue  # a Secret reference, checked below
        assert env.get(key) == value, f"{name}: vLLM env {key}"
    _assert_engine_key_from_the_secret(env)


def _assert_engine_key_from_the_secret(env: dict[str, Any]) -> None:
    """vLLM's key and the engine setting come from the same Secret key, never a literal."""
    refs = [env.get(name) for name in ("VLLM_API_KEY", "FEDPERSONA_ENGINE__API_KEY")]
    assert all(isinstance(ref, dict) and "secretKeyRef" in ref for ref in refs)
    assert refs[0] == refs[1]


def test_fedpersona_engine_process_prints_the_chart_command(helm_bin: Path) -> None:
    """The same, through the real `fedpersona engine` command run as a process."""
    prod = next(f for f in EXAMPLES if "gpu-production" in f.name)
    container = render(helm_bin, files=[prod]).container("vllm")
    launch = json.loads(fedpersona(["engine", "--json"], plain_env(container)))
    assert launch["argv"][1:] == container["command"][1:] + container["args"]
    assert "--logits-processors" in launch["argv"] and "--enable-prefix-caching" in launch["argv"]
    env = env_map(container)
    assert launch["env"].pop("VLLM_API_KEY") == "<redacted>"  # printed, never shown
    assert {k: env.get(k) for k in launch["env"]} == launch["env"]
    _assert_engine_key_from_the_secret(env)


def test_default_processor_is_the_engines_and_exists(helm_bin: Path) -> None:
    container = render(helm_bin, values={"proxyTuning": {"enabled": True}}).container("vllm")
    processor = container["args"][container["args"].index("--logits-processors") + 1]
    assert processor == EngineSettings().proxy_processor
    module, _, cls = processor.partition(":")
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None, module
    tree = ast.parse(Path(spec.origin).read_text())
    assert cls in {n.name for n in tree.body if isinstance(n, ast.ClassDef)}


# ---- gateway: its environment is what the real Settings read ---------------------------------


def _known_setting(name: str) -> bool:
    field = name.removeprefix("FEDPERSONA_").lower()
    top, _, nested = field.partition("__")
    if top not in Settings.model_fields:
        return False
    return not nested or (top == "engine" and nested in EngineSettings.model_fields)


@pytest.mark.parametrize(("name", "files", "values"), ENGINE_CASES, ids=CASE_IDS)
def test_gateway_env_is_read_by_the_real_settings(
    helm_bin: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    files: list[Path],
    values: dict[str, Any] | None,
) -> None:
    rendered = render(helm_bin, files=files, values=values)
    gateway = rendered.container("gateway")
    names = [n for n in env_map(gateway) if n.startswith("FEDPERSONA_")]
    # pydantic-settings ignores unknown names: a typo would be silently dropped.
    assert [n for n in names if not _known_setting(n)] == []

    for key in list(os.environ):
        if key.startswith("FEDPERSONA_"):
            monkeypatch.delenv(key)
    extra = {"FEDPERSONA_ADMIN_KEY": ADMIN_KEY, "FEDPERSONA_ENGINE__API_KEY": ENGINE_KEY}
    for key, value in plain_env(gateway, **extra).items():
        if key.startswith("FEDPERSONA_"):
            monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.engine_key == ENGINE_KEY and not settings.docs
    port = int(gateway["ports"][0]["containerPort"])
    assert (settings.host, settings.port, settings.home) == ("0.0.0.0", port, Path("/data"))
    assert settings.admin_enabled
    assert settings.adapter_max_rank == settings.engine.max_lora_rank

    # The gateway's picture of the engine is the engine the chart runs.
    vllm = rendered.container("vllm")
    for key in list(os.environ):
        if key.startswith("FEDPERSONA_"):
            monkeypatch.delenv(key)
    for key, value in env_map(vllm).items():
        if key.startswith("FEDPERSONA_ENGINE__") and isinstance(value, str):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("FEDPERSONA_ENGINE__API_KEY", ENGINE_KEY)
    engine = EngineSettings.model_validate(Settings(environment="development").engine)
    ignore = {"url", "host", "port"}
    assert settings.engine.model_dump(exclude=ignore) == engine.model_dump(exclude=ignore)
    service = rendered.get("Service", "vllm")
    assert settings.engine.url == (
        f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    )


# ---- every `fedpersona` command line in the chart and the images parses ---------------------


def _parse(argv: list[str]) -> Any:
    from fedpersona.cli import build_parser

    return build_parser().parse_args(argv)


def test_chart_command_lines_parse_with_the_real_cli(helm_bin: Path) -> None:
    dev = next(f for f in EXAMPLES if "cpu-dev" in f.name)
    rendered = render(helm_bin, files=[dev])
    gateway = rendered.container("gateway")
    assert gateway["command"] == ["fedpersona"]
    args = _parse(gateway["args"])
    assert args.command == "serve"
    # Rounds belong to the trainer pod, never to each gateway replica: the gateway forwards
    # /admin/rounds to the trainer Service (the HTTP round controller).
    assert args.no_rounds is False
    assert args.engine_url == env_map(gateway)["FEDPERSONA_ENGINE__URL"]
    (service,) = [
        s
        for s in rendered.all("Service")
        if any(p["name"] == "api" for p in s["spec"]["ports"])
        and s["metadata"]["labels"]["app.kubernetes.io/component"] == "trainer"
    ]
    port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "api")
    assert env_map(gateway)["FEDPERSONA_ROUNDS_URL"] == (
        f"http://{service['metadata']['name']}:{port}/admin/rounds"
    )
    alone = render(helm_bin, files=[dev], values={"trainer": {"enabled": False}})
    assert _parse(alone.container("gateway")["args"]).no_rounds is True
    assert "FEDPERSONA_ROUNDS_URL" not in env_map(alone.container("gateway"))

    trainer = rendered.container("trainer")
    assert trainer["command"] == ["fedpersona"]
    args = _parse(trainer["args"])
    assert args.command == "trainer"
    assert (args.host, args.port) == ("0.0.0.0", trainer["ports"][0]["containerPort"])
    assert not args.superlink  # the SuperLink is the pod's other container
    # The dev example trains the silos on the volume; the settings the real CLI builds accept it.
    from fedpersona.trainer_api import build_settings

    assert args.engine == "simulation"
    assert build_settings(args).superlink_target() is None

    (init,) = rendered.pod_spec("vllm")["initContainers"]
    assert init["command"][0] == "fedpersona"
    assert _parse(init["command"][1:]).command == "models"


def dockerfile_exec_form(path: Path, instruction: str) -> list[str]:
    """The JSON (exec) form of the last ENTRYPOINT/CMD of a Dockerfile."""
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith(instruction + " ")]
    assert lines, f"{path.name} has no {instruction}"
    value = json.loads(lines[-1][len(instruction) + 1 :])
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def dockerfile_user(path: Path) -> str:
    users = [ln.split()[1] for ln in path.read_text().splitlines() if ln.startswith("USER ")]
    assert users, f"{path.name} sets no USER"
    return users[-1]


def test_dockerfiles_run_the_chart_commands(
    helm_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rendered = render(helm_bin, values={"roundSchedule": {"enabled": True}})
    gateway_df = REPO / "docker" / "gateway.Dockerfile"
    vllm_df = REPO / "docker" / "vllm.Dockerfile"

    entry = dockerfile_exec_form(gateway_df, "ENTRYPOINT")
    assert entry == rendered.container("gateway")["command"]
    assert entry == rendered.container("trainer")["command"]
    cmd = dockerfile_exec_form(gateway_df, "CMD")
    assert cmd[0] == rendered.container("gateway")["args"][0] == "serve"
    assert _parse(cmd).command == "serve"
    # The round schedule's one-liner needs the image's python.
    assert rendered.container("round-schedule", "CronJob")["command"][0] == "python"

    vllm_entry = dockerfile_exec_form(vllm_df, "ENTRYPOINT")
    assert vllm_entry == rendered.container("vllm")["command"]
    launch = _engine_launch(rendered.container("vllm"), monkeypatch)
    assert launch.argv[1:3] == vllm_entry[1:]

    for dockerfile in (gateway_df, vllm_df):
        assert dockerfile_user(dockerfile).split(":")[0] not in {"root", "0"}, dockerfile.name


# ---- the round schedule's job, run as a plain process -------------------------------------


class _Recorder(BaseHTTPRequestHandler):
    status = 202
    seen: list[dict[str, Any]] = []  # noqa: RUF012  (one server per test, reset there)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).seen.append(
            {"path": self.path, "auth": self.headers["Authorization"], "body": json.loads(body)}
        )
        payload = json.dumps({"id": "run-1", "state": "queued"}).encode()
        self.send_response(type(self).status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self) -> None:
        type(self).seen.append({"path": self.path})
        payload = b'{"status": "ready"}'
        self.send_response(type(self).status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def rounds_server() -> Iterator[tuple[str, type[_Recorder]]]:
    handler = type("Recorder", (_Recorder,), {"seen": [], "status": 202})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def _run_job(rendered: Rendered, base_url: str) -> subprocess.CompletedProcess[str]:
    container = rendered.container("round-schedule", "CronJob")
    url = urlsplit(env_map(container)["ROUNDS_URL"])
    env = plain_env(container, FEDPERSONA_ADMIN_KEY=ADMIN_KEY, ROUNDS_URL=base_url + url.path)
    argv = [sys.executable, *container["command"][1:]]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)


def test_round_schedule_job_posts_the_spec_with_the_admin_key(
    helm_bin: Path, rounds_server: tuple[str, type[_Recorder]]
) -> None:
    base_url, recorder = rounds_server
    spec = {"algorithm": "fedavg", "rounds": 2, "users": ["alice", "bob"]}
    rendered = render(helm_bin, values={"roundSchedule": {"enabled": True, "round": spec}})
    proc = _run_job(rendered, base_url)
    assert proc.returncode == 0, proc.stderr
    assert recorder.seen == [{"path": "/admin/rounds", "auth": f"Bearer {ADMIN_KEY}", "body": spec}]
    # The body is a spec the trainer's public interface accepts.
    from fedpersona.trainer.rounds.interface import RoundSpec

    assert RoundSpec(**recorder.seen[0]["body"]).rounds == 2

    recorder.status = 409  # a round is already running: the job must fail, not pretend
    assert _run_job(rendered, base_url).returncode != 0


# ---- the model-init step, run as a plain process ------------------------------------------


def test_model_init_copies_once_and_never_leaves_half_a_model(
    helm_bin: Path, tmp_path: Path
) -> None:
    rendered = render(helm_bin, values={"model": {"init": {"enabled": True, "copyFrom": "/m"}}})
    (init,) = rendered.pod_spec("vllm")["initContainers"]
    source = tmp_path / "image-model"
    (source / "sub").mkdir(parents=True)
    (source / "config.json").write_text('{"model_type": "llama"}')
    (source / "sub" / "weights.bin").write_bytes(b"\x00" * 1024)
    model_dir = tmp_path / "data" / "models" / "large"
    env = plain_env(init, MODEL_DIR=str(model_dir), COPY_FROM=str(source))

    first = subprocess.run(init["command"], env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert (model_dir / "config.json").read_text() == '{"model_type": "llama"}'
    assert (model_dir / "sub" / "weights.bin").stat().st_size == 1024
    assert not Path(f"{model_dir}.partial").exists()

    (source / "config.json").write_text("changed")  # a present model is never overwritten
    second = subprocess.run(init["command"], env=env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 0 and "model present" in second.stdout
    assert (model_dir / "config.json").read_text() == '{"model_type": "llama"}'

    broken = plain_env(init, MODEL_DIR=str(tmp_path / "other"), COPY_FROM=str(tmp_path / "none"))
    failed = subprocess.run(init["command"], env=broken, capture_output=True, text=True)
    assert failed.returncode != 0
    assert not (tmp_path / "other").exists()  # a failed copy leaves no model dir behind


# ---- the `helm test` pod, run as a plain process ------------------------------------------


def test_helm_test_pod_checks_the_gateway_ready_endpoint(
    helm_bin: Path, rounds_server: tuple[str, type[_Recorder]]
) -> None:
    base_url, recorder = rounds_server
    rendered = render(helm_bin)
    (pod,) = rendered.all("Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = pod["spec"]["containers"]
    url = urlsplit(env_map(container)["READY_URL"])
    gateway = rendered.get("Service", "gateway")
    assert url.netloc == f"{gateway['metadata']['name']}:{gateway['spec']['ports'][0]['port']}"
    env = {**plain_env(container), "READY_URL": base_url + url.path}
    argv = [sys.executable, *container["command"][1:]]

    recorder.status = 200
    ok = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert recorder.seen == [{"path": "/ready"}]
    recorder.status = 503  # not ready: the test must fail
    assert subprocess.run(argv, env=env, capture_output=True, timeout=60).returncode != 0


# ---- the trainer pod: its settings and its SuperLink ----------------------------------------


def test_trainer_env_is_read_by_the_real_trainer_settings(
    helm_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pydantic import ValidationError

    from fedpersona.trainer_api import TrainerApiSettings

    container = render(helm_bin).container("trainer")
    names = [n for n in env_map(container) if n.startswith("FEDPERSONA_")]
    unknown = [
        n
        for n in names
        if n.removeprefix("FEDPERSONA_").lower() not in TrainerApiSettings.model_fields
    ]
    assert unknown == []
    for key in list(os.environ):
        if key.startswith("FEDPERSONA_"):
            monkeypatch.delenv(key)
    for key, value in plain_env(container, FEDPERSONA_ADMIN_KEY=ADMIN_KEY).items():
        if key.startswith("FEDPERSONA_"):
            monkeypatch.setenv(key, value)
    settings = TrainerApiSettings(host="0.0.0.0")
    assert settings.home == Path("/data")
    assert settings.environment == "production" and settings.admin_enabled
    # The gateway's rule, applied by the same settings class: no weak key in production.
    monkeypatch.setenv("FEDPERSONA_ADMIN_KEY", "short")
    with pytest.raises(ValidationError, match="admin_key"):
        TrainerApiSettings(host="0.0.0.0")


def test_trainer_runs_go_to_the_pods_superlink_with_the_node_bindings(
    helm_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default trainer command line, parsed by the real CLI into the real settings: runs go
    to the SuperLink's Control API in the pod over TLS, each carrying the node bindings."""
    from fedpersona.trainer_api import build_settings

    for key in list(os.environ):
        if key.startswith("FEDPERSONA_"):
            monkeypatch.delenv(key)
    rendered = render(helm_bin)
    args = _parse(rendered.container("trainer")["args"])
    target = build_settings(args).superlink_target()
    control = next(
        p["containerPort"]
        for p in rendered.container("trainer", name="superlink")["ports"]
        if p["name"] == "control"
    )
    assert target is not None and target.control == f"localhost:{control}"
    assert target.root_certificates == Path("/etc/fedpersona/tls/ca.crt")
    assert target.node_bindings == Path("/etc/fedpersona/node-bindings/node-bindings.json")
    child = target.child_args()
    assert child[child.index("--node-bindings") + 1] == str(target.node_bindings)
    # The training child accepts exactly these flags.
    train = _parse(["train", "--run-id", "r", *child])
    assert train.node_bindings == target.node_bindings
    assert train.root_certificates == target.root_certificates

    insecure = render(helm_bin, values={"trainer": {"superlink": {"dangerouslyInsecure": True}}})
    target = build_settings(_parse(insecure.container("trainer")["args"])).superlink_target()
    assert target is not None and target.root_certificates is None and target.node_bindings is None


def test_superlink_container_has_every_flag_the_trainer_would_use(helm_bin: Path) -> None:
    """`fedpersona.trainer.flower.deployment.superlink_command` with TLS (the Deployment
    Engine's default: TLS and SuperNode authentication) and the chart's container agree."""
    from fedpersona.trainer.flower.deployment import SuperLinkAddresses, superlink_command
    from fedpersona.trainer.flower.identity import TlsFiles

    rendered = render(helm_bin)
    superlink = rendered.container("trainer", name="superlink")
    chart = superlink["args"]
    ports = {p["name"]: p["containerPort"] for p in superlink["ports"]}
    addresses = SuperLinkAddresses.on(
        "0.0.0.0", fleet=ports["fleet"], serverappio=9091, control=ports["control"]
    )
    tls = TlsFiles(
        ca_cert=Path("/etc/fedpersona/tls/ca.crt"),
        server_cert=Path("/etc/fedpersona/tls/tls.crt"),
        server_key=Path("/etc/fedpersona/tls/tls.key"),
    )
    embedded = superlink_command(addresses, database=Path("/data/superlink.db"), tls=tls)
    assert "--insecure" not in chart
    assert Path(embedded[0]).name == superlink["command"][0]
    i = 1
    while i < len(embedded):
        flag = embedded[i]
        assert flag in chart, flag
        if i + 1 < len(embedded) and not embedded[i + 1].startswith("--"):
            value = chart[chart.index(flag) + 1]
            if flag == "--serverappio-api-address":
                assert value == "127.0.0.1:9091"  # loopback: only the pod's own processes
            else:
                assert value == embedded[i + 1], flag
            i += 2
        else:
            i += 1
