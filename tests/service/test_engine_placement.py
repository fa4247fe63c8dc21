"""The CPU build's placement: vLLM's compute cores named, the gateway kept off them.

Unit tests for the CPU list, the plan and the launch; then `fedpersona serve` as a real process
with its own real vLLM (micro model) and `FEDPERSONA_ENGINE__CPU_CORES=0`: the gateway runs on
the other CPUs, every vLLM thread on CPU 0 (its compute bound there), and a chat is answered.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from fedpersona.service.engine.config import EngineSettings, build_launch, engine_env
from fedpersona.service.engine.placement import parse_cpu_list, plan
from fedpersona.service.registry import Registry
from pydantic import ValidationError
from support.processes import started
from support.servers import free_port


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("0", {0}), ("0-3", {0, 1, 2, 3}), ("0,2-3", {0, 2, 3}), (" 1 , 4 ", {1, 4})],
)
def test_cpu_lists(text: str, cpus: set[int]) -> None:
    assert parse_cpu_list(text) == cpus


@pytest.mark.parametrize("text", ["", "a", "0-", "-1", "3-1", "0;1", "1.5"])
def test_what_is_not_a_cpu_list(text: str) -> None:
    with pytest.raises(ValueError):
        parse_cpu_list(text)
    with pytest.raises(ValidationError):
        EngineSettings(cpu_cores=text)


def test_plan_leaves_the_rest_to_the_gateway() -> None:
    placement = plan("0-1", allowed={0, 1, 2, 3})
    assert placement.compute == {0, 1}
    assert placement.gateway == {2, 3}
    assert placement.engine == {0, 1}  # vLLM's front end too


def test_plan_refuses_cores_that_are_not_there_or_all_of_them() -> None:
    with pytest.raises(ValueError, match=r"names CPUs \[7\]"):
        plan("6-7", allowed={0, 1, 2, 3, 4, 5, 6})
    with pytest.raises(ValueError, match="leaves no CPU for the gateway"):
        plan("0-1", allowed={0, 1})


def test_the_launch_binds_vllms_compute_threads(tmp_path: Path) -> None:
    bound = EngineSettings(cpu_cores="0-2", served_model_name="m", model_dir=tmp_path)
    assert engine_env(bound, store_dir=tmp_path, api_key="k")["VLLM_CPU_OMP_THREADS_BIND"] == "0-2"
    free = EngineSettings(served_model_name="m", model_dir=tmp_path)
    assert "VLLM_CPU_OMP_THREADS_BIND" not in engine_env(free, store_dir=tmp_path, api_key="k")
    launch = build_launch(bound, home=tmp_path, cpus=frozenset({0, 1, 2, 3}))
    assert launch.cpus == {0, 1, 2, 3}
    assert "VLLM_CPU_OMP_THREADS_BIND=0-2" in launch.shell()


def _serve_argv(home: Path) -> tuple[list[str], str]:
    port = free_port()
    argv = [sys.executable, "-m", "fedpersona", "serve", "--home", str(home)]
    argv += ["--port", str(port), "--engine-port", str(free_port()), "--no-rounds"]
    return argv, f"http://127.0.0.1:{port}"


def test_serve_refuses_a_placement_that_leaves_the_gateway_nothing(
    micro_models: Any, tmp_path: Path
) -> None:
    cpus = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    env = {
        "FEDPERSONA_ENGINE__MODEL_DIR": str(micro_models.large.path),
        "FEDPERSONA_ENGINE__CPU_CORES": cpus,
    }
    argv, _ = _serve_argv(tmp_path)
    with started(argv, env={**os.environ, **env}, log=tmp_path / "gateway.log") as proc:
        assert proc.wait(timeout=60) == 2
    assert "leaves no CPU for the gateway" in (tmp_path / "gateway.log").read_text()


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_embedded_engine_computes_apart_from_the_gateway(micro_models: Any, tmp_path: Path) -> None:
    allowed = set(os.sched_getaffinity(0))
    compute = min(allowed)
    registry = Registry(tmp_path / "registry.sqlite")
    registry.create_user("alice")
    key = registry.issue_key("alice").api_key
    env = {
        "FEDPERSONA_ENGINE__MODEL_DIR": str(micro_models.large.path),
        "FEDPERSONA_ENGINE__MAX_MODEL_LEN": "256",
        "FEDPERSONA_ENGINE__KV_CACHE_GIB": "1",
        "FEDPERSONA_ENGINE__CPU_CORES": str(compute),
    }
    log_path = tmp_path / "gateway.log"
    argv, base = _serve_argv(tmp_path)
    with started(argv, env={**os.environ, **env}, log=log_path) as proc:
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)

        gateway = psutil.Process(proc.pid)
        assert set(gateway.cpu_affinity()) == allowed - {compute}
        assert all(
            set(os.sched_getaffinity(t.id)) == allowed - {compute} for t in gateway.threads()
        )
        engine = gateway.children()
        assert engine, "the gateway started no vLLM"
        vllm = [engine[0], *engine[0].children(recursive=True)]
        threads = [t.id for p in vllm for t in p.threads()]
        assert threads and all(set(os.sched_getaffinity(t)) == {compute} for t in threads), (
            "a vLLM thread runs off its core"
        )
        vllm_log = (tmp_path / "logs" / "vllm.log").read_text()
        assert f"VLLM_CPU_OMP_THREADS_BIND='{compute}'" in vllm_log

        answer = httpx.post(
            f"{base}/v1/chat/completions",
            json={
                "model": "personal",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4,
            },
            headers={"Authorization": f"Bearer {key}"},
            timeout=120,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] is not None
    assert f"engine compute on CPUs {compute}" in log_path.read_text()
