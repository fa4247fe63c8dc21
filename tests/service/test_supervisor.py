"""EngineSupervisor against a fake engine process (a tiny stdlib HTTP server script).

Real processes, real signals, real /health polling: start and ready, restart after a crash (and
the restart listeners), a failed first start reporting the log's last lines, the ready timeout,
SIGTERM drain of a request in flight, and SIGKILL when the child ignores SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from fedpersona.service.engine.client import EngineClient
from fedpersona.service.engine.config import EngineLaunch
from fedpersona.service.engine.supervisor import (
    EngineState,
    EngineSupervisor,
    backoff_delay,
    log_tail,
)
from fedpersona.service.errors import EngineStartFailed, EngineUnavailable

T = TypeVar("T")
FAKE = Path(__file__).with_name("fake_vllm_process.py")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def supervisor(tmp_path: Path, *flags: str, **kw: Any) -> EngineSupervisor:
    port = free_port()
    launch = EngineLaunch(
        argv=[sys.executable, str(FAKE), "--port", str(port), *flags],
        env={"FAKE_MARKER": "1"},
        base_url=f"http://127.0.0.1:{port}",
        served_model_name="fake",
    )
    kw.setdefault("poll_interval_s", 0.05)
    kw.setdefault("health_interval_s", 0.1)
    kw.setdefault("backoff_base_s", 0.05)
    return EngineSupervisor(launch, log_path=tmp_path / "logs" / "vllm.log", **kw)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still "exists"; check its state.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


async def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def test_backoff_doubles_and_caps() -> None:
    assert [backoff_delay(n, base=1, cap=10) for n in range(1, 6)] == [1, 2, 4, 8, 10]


def test_start_ready_stop(tmp_path: Path) -> None:
    sup = supervisor(tmp_path, "--startup-delay", "0.3")
    progress: list[str] = []
    sup._progress = progress.append

    async def main() -> int:
        await sup.start()
        assert sup.state is EngineState.STARTING
        with pytest.raises(EngineUnavailable) as err:
            sup.check_available()
        assert err.value.retry_after == 5.0
        await sup.wait_ready(timeout=20)
        assert sup.state is EngineState.READY
        sup.check_available()
        pid = sup.pid
        assert pid is not None and alive(pid)
        await sup.stop()
        assert sup.state is EngineState.STOPPED
        return pid

    pid = run(main())
    assert not alive(pid)
    assert progress and progress[0].startswith("starting vLLM")
    log = (tmp_path / "logs" / "vllm.log").read_text()
    assert "fake vllm: listening" in log and "SIGTERM, shutting down" in log
    assert "FAKE_MARKER=1" in log  # the exact command line is logged
    assert sup.ready_after_s is not None and sup.ready_after_s >= 0.3


def test_restarts_after_crash_and_tells_listeners(tmp_path: Path) -> None:
    sup = supervisor(tmp_path)
    restarted: list[EngineState] = []
    sup.on_restart(lambda: restarted.append(sup.state))

    async def main() -> None:
        await sup.start()
        await sup.wait_ready(timeout=20)
        first = sup.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        await wait_for(lambda: sup.state is not EngineState.READY)
        with pytest.raises(EngineUnavailable):
            sup.check_available()
        await wait_for(lambda: sup.state is EngineState.READY and sup.pid != first, 20)
        assert restarted == [EngineState.RESTARTING]
        assert sup.restarts == 1
        await sup.stop()

    run(main())


def test_a_crashed_engines_orphaned_children_are_killed(tmp_path: Path) -> None:
    # vLLM's engine core survives a SIGKILLed API server; the supervisor must not leak it (each
    # leaked core holds a copy of the model in memory).
    pidfile = tmp_path / "core.pid"
    sup = supervisor(tmp_path, "--engine-core-pidfile", str(pidfile))

    async def main() -> None:
        await sup.start()
        await sup.wait_ready(timeout=20)
        first, first_core = sup.pid, int(pidfile.read_text())
        assert first is not None and alive(first_core)
        os.kill(first, signal.SIGKILL)
        await wait_for(lambda: sup.state is EngineState.READY and sup.pid != first, 20)
        await wait_for(lambda: not alive(first_core))
        second_core = int(pidfile.read_text())
        assert second_core != first_core and alive(second_core)
        await sup.stop()
        await wait_for(lambda: not alive(second_core))

    run(main())


def test_unhealthy_engine_is_killed_and_restarted(tmp_path: Path) -> None:
    # Healthy for 1 s, then /health fails while the process lives on (a hung engine).
    sup = supervisor(tmp_path, "--unhealthy-after", "1.0", health_failures=2)

    async def main() -> None:
        await sup.start()
        await sup.wait_ready(timeout=20)
        first = sup.pid
        assert first is not None
        await wait_for(lambda: sup.restarts == 1, 20)
        assert not alive(first)
        await sup.stop()

    run(main())


def test_failed_first_start_reports_log_tail(tmp_path: Path) -> None:
    sup = supervisor(tmp_path, "--exit-at-start")

    async def main() -> None:
        await sup.start()
        with pytest.raises(EngineStartFailed, match="no such model directory") as err:
            await sup.wait_ready(timeout=20)
        assert "exit status 1" in str(err.value)
        assert sup.state is EngineState.FAILED
        with pytest.raises(EngineUnavailable) as unavailable:
            sup.check_available()
        assert unavailable.value.retry_after == 60.0
        await sup.stop()

    run(main())


def test_ready_timeout_kills_the_child(tmp_path: Path) -> None:
    sup = supervisor(tmp_path, "--startup-delay", "60", ready_timeout_s=0.5)

    async def main() -> int | None:
        await sup.start()
        with pytest.raises(EngineStartFailed):
            await sup.wait_ready(timeout=20)
        return sup.pid

    pid = run(main())
    assert pid is not None and not alive(pid)


def test_sigterm_drains_requests_in_flight(tmp_path: Path) -> None:
    sup = supervisor(tmp_path, "--reply-delay", "1.0")

    async def main() -> None:
        await sup.start()
        await sup.wait_ready(timeout=20)
        client = EngineClient(sup.launch.base_url, gate=sup.check_available)
        in_flight = asyncio.create_task(client.chat({"model": "fake", "messages": []}))
        await wait_for(lambda: client.in_flight == 1)
        stopping = asyncio.create_task(sup.stop(10.0, wait_idle=client.wait_idle))
        await wait_for(lambda: sup.state is EngineState.DRAINING)
        with pytest.raises(EngineUnavailable):  # new work is refused while draining
            await client.chat({"model": "fake", "messages": []})
        answer = await in_flight  # the request in flight completes normally
        assert answer["model"] == "fake"
        await stopping
        assert sup.state is EngineState.STOPPED
        await client.aclose()

    run(main())


def test_drain_is_bounded(tmp_path: Path) -> None:
    sup = supervisor(tmp_path, "--reply-delay", "30")

    async def main() -> float:
        await sup.start()
        await sup.wait_ready(timeout=20)
        client = EngineClient(sup.launch.base_url)
        stuck = asyncio.create_task(client.chat({"model": "fake", "messages": []}))
        await wait_for(lambda: client.in_flight == 1)
        started = time.monotonic()
        await sup.stop(0.5, wait_idle=client.wait_idle)
        took = time.monotonic() - started
        with pytest.raises(EngineUnavailable):  # the engine went away under it
            await stuck
        await client.aclose()
        return took

    assert run(main()) < 5


def test_sigkill_when_sigterm_is_ignored(tmp_path: Path) -> None:
    sup = supervisor(tmp_path, "--ignore-sigterm", stop_timeout_s=0.5)

    async def main() -> tuple[int, float]:
        await sup.start()
        await sup.wait_ready(timeout=20)
        pid = sup.pid
        assert pid is not None
        started = time.monotonic()
        await sup.stop()
        return pid, time.monotonic() - started

    pid, took = run(main())
    assert not alive(pid)
    assert 0.5 <= took < 5
    assert "ignoring SIGTERM" in (tmp_path / "logs" / "vllm.log").read_text()


def test_log_tail_of_missing_file_is_empty(tmp_path: Path) -> None:
    assert log_tail(tmp_path / "nope.log") == ""
    (tmp_path / "a.log").write_text("".join(f"line {i}\n" for i in range(100)))
    assert log_tail(tmp_path / "a.log", 3) == "line 97\nline 98\nline 99"


def test_serve_builds_the_supervisor_from_settings(tmp_path: Path) -> None:
    from fedpersona.service.commands.serve import build_supervisor
    from fedpersona.service.settings import Settings

    engine = {"model_dir": tmp_path, "served_model_name": "m", "port": 9, "ready_timeout_s": 7}
    sup = build_supervisor(Settings(home=tmp_path, engine=engine))
    assert sup.log_path == tmp_path / "logs" / "vllm.log"
    assert sup.launch.base_url == "http://127.0.0.1:9"
    assert sup._ready_timeout_s == 7
    assert sup.state is EngineState.STOPPED
    assert build_supervisor(Settings(home=tmp_path, engine={"url": "http://x:1"})) is None
