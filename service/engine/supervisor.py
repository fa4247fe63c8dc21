"""Run vLLM as a supervised child process: start, wait until ready, restart, drain and stop.

`EngineSupervisor` starts the command built by `fedpersona.service.engine.config.build_launch`
on loopback, logs its output to a file, polls `/health` until it answers (reporting progress),
restarts it with exponential backoff when it dies or stops answering, and stops it on
shutdown: first it lets requests in flight finish (bounded), then SIGTERM, then SIGKILL of its
process group.

While the engine is not `READY` the gateway answers 503 with `Retry-After`:
`check_available()` raises `EngineUnavailable` and is meant as `EngineClient`'s gate. After a
restart vLLM has lost every runtime-loaded adapter; listeners registered with `on_restart`
(the `AdapterManager.reset`) are told before traffic resumes.

Wiring (what `fedpersona serve` does without `--engine-url`): `commands/serve.py` builds

    launch = build_launch(settings.engine, home=settings.home, store_dir=settings.store_path)
    supervisor = EngineSupervisor(launch, log_path=settings.engine_log, ready_timeout_s=...)
    engine = EngineClient(launch.base_url, gate=supervisor.check_available)

and hands both to `fedpersona.service.http.app.create_app`, whose lifespan registers the
`AdapterManager.reset` with `supervisor.on_restart`, calls `supervisor.start()` at start-up
(a background task awaits `wait_ready` and logs the outcome; chat requests get 503 from the
gate until then) and `supervisor.stop(shutdown_grace_s, wait_idle=engine.wait_idle)` at
shutdown.

A start that cannot succeed is not retried forever: a first start that dies, too many deaths in
a row, or an engine port held by another process (checked before every spawn, so a gateway never
reports ready on someone else's vLLM) make the state `FAILED`, and the callbacks registered with
`on_failure` get the reason (`fedpersona serve` stops with it instead of answering 503 forever).

This module does not know the OpenAI API or adapters; it knows processes, ports and `/health`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import enum
import functools
import logging
import math
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from fedpersona.service.engine.config import EngineLaunch
from fedpersona.service.errors import EngineStartFailed, EngineUnavailable

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


class EngineState(enum.StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"  # first start, not ready yet
    READY = "ready"
    RESTARTING = "restarting"  # died after having been ready; coming back
    DRAINING = "draining"  # shutting down: finishing requests in flight
    FAILED = "failed"  # gave up (could not start, or too many restarts in a row)


def backoff_delay(attempt: int, *, base: float = 1.0, cap: float = 30.0) -> float:
    """Seconds to wait before restart number `attempt` (1, 2, ...): base * 2^(attempt-1), capped."""
    return min(cap, base * 2 ** max(0, attempt - 1))


def log_tail(path: Path, lines: int = 30) -> str:
    """The last `lines` lines of a log file ('' if it does not exist)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            data = f.read()
    except FileNotFoundError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def port_in_use(host: str, port: int) -> bool:
    """True when something listens on `host:port` (a bind fails; TIME_WAIT leftovers do not
    count, as the server binds with SO_REUSEADDR too)."""
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def launch_address(launch: EngineLaunch) -> tuple[str, int]:
    """(host, port) the launch's server listens on, from its argv (else its base URL)."""
    argv = launch.argv
    url = urlsplit(launch.base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    for flag, i in ((a, i) for i, a in enumerate(argv[:-1])):
        if flag == "--host":
            host = argv[i + 1]
        elif flag == "--port":
            port = int(argv[i + 1])
    return host, port


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    """Ask Linux to SIGTERM the child if the gateway dies without stopping it."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _child_setup(cpus: frozenset[int] | None) -> None:  # pragma: no cover - in the child
    """`_die_with_parent`, and the CPUs the launch gives vLLM (not the gateway's own)."""
    _die_with_parent()
    if cpus is not None:
        os.sched_setaffinity(0, cpus)


class EngineSupervisor:
    """Supervises one vLLM server process described by `launch`."""

    def __init__(
        self,
        launch: EngineLaunch,
        *,
        log_path: Path,
        ready_timeout_s: float = 600.0,
        stop_timeout_s: float = 20.0,
        poll_interval_s: float = 0.5,
        health_interval_s: float = 5.0,
        health_failures: int = 3,
        max_restarts: int = 5,
        backoff_base_s: float = 1.0,
        progress: Callable[[str], None] | None = None,
        progress_every_s: float = 5.0,
    ) -> None:
        """`progress` receives a status line (elapsed time, last log line) every
        `progress_every_s` while vLLM starts; without it the line is logged."""
        self.launch = launch
        self.log_path = log_path
        self._ready_timeout_s = ready_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._poll_interval_s = poll_interval_s
        self._health_interval_s = health_interval_s
        self._health_failures = health_failures
        self._max_restarts = max_restarts
        self._backoff_base_s = backoff_base_s
        self._progress = progress
        self._progress_every_s = progress_every_s
        self._state = EngineState.STOPPED
        self._proc: asyncio.subprocess.Process | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._settled = asyncio.Event()  # set when READY or FAILED
        self._stopping = False
        self._failure: str | None = None
        self._listeners: list[Callable[[], None]] = []
        self._failure_listeners: list[Callable[[str], None]] = []
        self._restarts = 0
        self.ready_after_s: float | None = None  # time the last start took to become ready

    # -- state for the gateway -------------------------------------------------------------

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def ready(self) -> bool:
        return self._state is EngineState.READY

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def restarts(self) -> int:
        """How many times the engine was restarted after dying."""
        return self._restarts

    @property
    def retry_after(self) -> float:
        """A client's sensible wait before retrying while the engine is not ready."""
        if self._state is EngineState.FAILED:
            return 60.0
        return 5.0

    def check_available(self) -> None:
        """Raise `EngineUnavailable` (503 + Retry-After) unless the engine is ready."""
        if self._state is not EngineState.READY:
            raise EngineUnavailable(
                f"The inference engine is {self._state.value}; retry later.",
                retry_after=self.retry_after,
            )

    def on_restart(self, callback: Callable[[], None]) -> None:
        """Call `callback` each time the engine was restarted (it lost its loaded adapters)."""
        self._listeners.append(callback)

    def on_failure(self, callback: Callable[[str], None]) -> None:
        """Call `callback(reason)` once when the supervisor gives up (state `FAILED`); the
        reason ends with the last lines of vLLM's log."""
        self._failure_listeners.append(callback)

    @property
    def failure(self) -> str | None:
        """Why the supervisor gave up (None unless `FAILED`)."""
        return self._failure

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the child and supervise it in the background; see `wait_ready`."""
        if self._monitor is not None:
            raise RuntimeError("the engine supervisor was already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._stopping = False
        self._failure = None
        self._settled.clear()
        self._state = EngineState.STARTING
        self._monitor = asyncio.get_running_loop().create_task(self._supervise())

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the engine is ready; raises `EngineStartFailed` if the supervisor gave
        up (with the end of vLLM's log) and `TimeoutError` if `timeout` passed first."""
        if self._monitor is None:
            raise RuntimeError("start() the supervisor first")
        await asyncio.wait_for(self._settled.wait(), timeout)
        if self._state is EngineState.FAILED:
            raise EngineStartFailed(self._failure or "the engine failed")
        if self._state is EngineState.STOPPED:
            raise EngineStartFailed("the engine was stopped before it became ready")

    async def stop(
        self,
        drain_timeout: float = 0.0,
        *,
        wait_idle: Callable[[float], Awaitable[bool]] | None = None,
    ) -> None:
        """Stop accepting work, let requests in flight finish for up to `drain_timeout`
        seconds (`wait_idle` is `EngineClient.wait_idle`), then stop vLLM."""
        self._stopping = True
        if self._state is EngineState.READY and wait_idle is not None and drain_timeout > 0:
            self._state = EngineState.DRAINING
            if not await wait_idle(drain_timeout):
                logger.warning(
                    "drain timed out after %.1f s; stopping the engine anyway", drain_timeout
                )
        self._state = EngineState.DRAINING
        await self._terminate()
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
            self._monitor = None
        self._state = EngineState.STOPPED
        self._settled.set()

    # -- the supervision loop --------------------------------------------------------------

    async def _supervise(self) -> None:
        ever_ready = False
        failures_in_a_row = 0
        while not self._stopping:
            host, port = launch_address(self.launch)
            if port_in_use(host, port):
                self._fail(
                    f"the engine port {host}:{port} is already in use by another process "
                    "(another gateway's vLLM?); this gateway would talk to it, not to its own",
                    with_log=False,
                )
                return
            proc = await self._spawn()
            became_ready = await self._wait_healthy(proc)
            if became_ready:
                ever_ready = True
                failures_in_a_row = 0
                self._state = EngineState.READY
                self._settled.set()
                await self._watch(proc)
            if self._stopping:  # stop() drains and terminates the group itself
                return
            # vLLM's engine core lives on in the child's process group after the API server
            # dies (SIGKILL, crash); left there it holds the model's memory forever.
            _kill_group(proc.pid)
            rc = proc.returncode
            if not ever_ready:
                self._fail(f"vLLM did not start (exit status {rc})")
                return
            failures_in_a_row += 1
            if failures_in_a_row > self._max_restarts:
                self._fail(f"vLLM died {failures_in_a_row} times in a row (last exit status {rc})")
                return
            self._state = EngineState.RESTARTING
            self._restarts += 1
            for callback in self._listeners:
                callback()
            delay = backoff_delay(failures_in_a_row, base=self._backoff_base_s)
            logger.error(
                "vLLM exited (status %s); restarting in %.0f s (see %s)", rc, delay, self.log_path
            )
            await asyncio.sleep(delay)

    async def _spawn(self) -> asyncio.subprocess.Process:
        with self.log_path.open("ab") as log:
            log.write(f"\n===== fedpersona: starting vLLM at {time.ctime()} =====\n".encode())
            log.write(f"{self.launch.shell()}\n".encode())
            log.flush()
            proc = await asyncio.create_subprocess_exec(
                *self.launch.argv,
                env=self.launch.environ(os.environ),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                # Its own process group: a terminal's Ctrl-C reaches only the gateway, which
                # stops vLLM in order; and the whole group can be killed at the end.
                start_new_session=True,
                preexec_fn=(
                    functools.partial(_child_setup, self.launch.cpus)
                    if sys.platform == "linux"
                    else None
                ),
            )
        self._proc = proc
        logger.info("started vLLM (pid %d), log: %s", proc.pid, self.log_path)
        return proc

    async def _wait_healthy(self, proc: asyncio.subprocess.Process) -> bool:
        """Poll /health until it answers 200 (True) or the child exits or times out (False)."""
        started = time.monotonic()
        last_report = -math.inf
        async with httpx.AsyncClient(base_url=self.launch.base_url, timeout=5.0) as client:
            while True:
                if proc.returncode is not None or self._stopping:
                    return False
                elapsed = time.monotonic() - started
                if elapsed > self._ready_timeout_s:
                    logger.error("vLLM not ready after %.0f s; killing it", elapsed)
                    await self._kill(proc)
                    return False
                if await _healthy(client):
                    self.ready_after_s = elapsed
                    logger.info("vLLM ready after %.1f s at %s", elapsed, self.launch.base_url)
                    return True
                if elapsed - last_report >= self._progress_every_s:
                    last_report = elapsed
                    message = f"starting vLLM ({elapsed:.0f} s): {_last_line(self.log_path)}"
                    if self._progress is not None:
                        self._progress(message)
                    else:
                        logger.info(message)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), self._poll_interval_s)

    async def _watch(self, proc: asyncio.subprocess.Process) -> None:
        """Return when the ready child exits, or kill it when it stops answering /health."""
        misses = 0
        async with httpx.AsyncClient(base_url=self.launch.base_url, timeout=5.0) as client:
            while proc.returncode is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), self._health_interval_s)
                if proc.returncode is not None or self._stopping:
                    break
                misses = 0 if await _healthy(client) else misses + 1
                if misses >= self._health_failures:
                    logger.error("vLLM failed %d health checks in a row; killing it", misses)
                    await self._kill(proc)
        if not self._stopping:
            await proc.wait()

    def _fail(self, reason: str, *, with_log: bool = True) -> None:
        tail = log_tail(self.log_path) if with_log else ""
        self._failure = f"{reason}. Last lines of {self.log_path}:\n{tail}" if tail else reason
        self._state = EngineState.FAILED
        self._settled.set()
        if not self._failure_listeners:  # a listener reports it (once) itself
            logger.error("%s", self._failure)
        for callback in self._failure_listeners:
            callback(self._failure)

    # -- stopping --------------------------------------------------------------------------

    async def _terminate(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is not None:
            _kill_group(proc.pid)
            return
        logger.info("stopping vLLM (pid %d)", proc.pid)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self._stop_timeout_s)
        except TimeoutError:
            logger.warning("vLLM ignored SIGTERM for %.0f s; killing it", self._stop_timeout_s)
            await self._kill(proc)
        else:
            # vLLM's own children (the engine core) normally exit with it; make sure.
            _kill_group(proc.pid)

    async def _kill(self, proc: asyncio.subprocess.Process) -> None:
        _kill_group(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def _kill_group(pgid: int) -> None:
    """SIGKILL what is left of a child's process group (the child leads it: new session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


async def _healthy(client: httpx.AsyncClient) -> bool:
    try:
        response = await client.get("/health")
    except httpx.HTTPError:
        return False
    return response.status_code == 200


def _last_line(path: Path) -> str:
    lines: deque[str] = deque(log_tail(path, 5).splitlines(), maxlen=1)
    return lines[0][-160:] if lines else ""
