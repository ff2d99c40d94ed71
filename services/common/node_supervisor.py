"""Runs the node's three services as child processes and keeps them alive (`peermirror node`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

SERVICES: tuple[str, ...] = ("discovery", "registry", "pinner")
# Set in each child's environment to the node's pid (no double underscore: not a config key).
SUPERVISOR_PID_ENV = "PEERMIRROR_SUPERVISOR_PID"
_PR_SET_PDEATHSIG = 1


# --- pure restart policy (no processes, no clock: callers pass `now`) -------------------------


@dataclass(frozen=True)
class RestartPolicy:
    """How quickly a dead child comes back.

    The delay doubles with every consecutive quick death (so a crash loop cannot spin the CPU) and
    is capped; a child that stayed up for `stable_after` seconds starts again from `initial_delay`.
    """

    initial_delay: float = 0.5
    max_delay: float = 30.0
    stable_after: float = 10.0

    def __post_init__(self) -> None:
        if self.initial_delay <= 0 or self.max_delay < self.initial_delay:
            raise ValueError("need 0 < initial_delay <= max_delay")
        if self.stable_after < 0:
            raise ValueError("stable_after must be >= 0")


@dataclass
class ChildRecord:
    """What the planner remembers about one child between its runs."""

    name: str
    started_at: float | None = None
    consecutive_failures: int = 0
    restarts: int = 0
    last_returncode: int | None = None


@dataclass(frozen=True)
class Restart:
    """A decision: start `name` again after `delay` seconds (the `attempt`-th quick retry)."""

    name: str
    delay: float
    attempt: int
    returncode: int
    uptime: float


@dataclass
class RestartPlanner:
    """Decides which child to restart and when; knows nothing about processes or time sources."""

    names: Sequence[str]
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    stopping: bool = False
    children: dict[str, ChildRecord] = field(init=False)

    def __post_init__(self) -> None:
        if len(set(self.names)) != len(self.names):
            raise ValueError("child names must be unique")
        self.children = {name: ChildRecord(name) for name in self.names}

    def started(self, name: str, now: float) -> None:
        """Record that `name` is running since `now`."""
        record = self.children[name]
        record.started_at = now

    def exited(self, name: str, returncode: int, now: float) -> Restart | None:
        """Record that `name` ended; return when to start it again, or None while shutting down."""
        record = self.children[name]
        uptime = 0.0 if record.started_at is None else max(0.0, now - record.started_at)
        record.started_at = None
        record.last_returncode = returncode
        if self.stopping:
            return None
        # Any exit is restarted, even code 0: a service only exits on its own when something is
        # wrong, and the node's job is to keep all three running until it is told to stop.
        if uptime >= self.policy.stable_after:
            record.consecutive_failures = 0
        record.consecutive_failures += 1
        record.restarts += 1
        delay = min(
            self.policy.initial_delay * 2 ** (record.consecutive_failures - 1),
            self.policy.max_delay,
        )
        return Restart(name, delay, record.consecutive_failures, returncode, uptime)

    def begin_shutdown(self) -> None:
        """From now on nothing is restarted."""
        self.stopping = True

    def running(self) -> list[str]:
        """Names of the children currently recorded as running."""
        return [r.name for r in self.children.values() if r.started_at is not None]

    def exit_status(self) -> int:
        """The node's exit code once everyone stopped: 0 only when every child's last exit was 0."""
        codes = [r.last_returncode for r in self.children.values()]
        return 0 if all(code == 0 for code in codes) else 1


# --- process I/O ------------------------------------------------------------------------------


class Log(Protocol):
    """The part of a structlog logger the supervisor uses."""

    def info(self, event: str, **kw: object) -> object: ...

    def warning(self, event: str, **kw: object) -> object: ...

    def error(self, event: str, **kw: object) -> object: ...


def child_command(service: str, config: Path | None) -> list[str]:
    """The argv that runs one service in the foreground with this interpreter."""
    argv = [sys.executable, "-m", "services.cli.main", service]
    if config is not None:
        argv += ["--config", str(config)]
    return argv


def follow_supervisor(env: Mapping[str, str]) -> bool:
    """In a child the node started: have the kernel send SIGTERM when the node dies.

    Without this a SIGKILLed node would leave its children running, holding the node's ports
    so the next node cannot start. Returns whether the child is supervised.
    """
    text = env.get(SUPERVISOR_PID_ENV, "")
    if not text.isdigit():
        return False
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != int(text):
        # The node died before the request above took effect: nobody would ever tell us.
        os.kill(os.getpid(), signal.SIGTERM)
    return True


class NodeSupervisor:
    """Starts every child, restarts the ones that die, and stops them all on SIGTERM/SIGINT."""

    def __init__(
        self,
        commands: Mapping[str, Sequence[str]],
        log: Log,
        *,
        policy: RestartPolicy | None = None,
        stop_timeout: float = 4.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._commands = dict(commands)
        self._log = log
        self._planner = RestartPlanner(list(self._commands), policy or RestartPolicy())
        self._stop_timeout = stop_timeout
        self._clock = clock
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._stop = asyncio.Event()

    def request_stop(self, signum: int | None = None) -> None:
        """Begin shutdown (signal handler and tests)."""
        if not self._planner.stopping:
            name = signal.Signals(signum).name if signum is not None else None
            self._log.info("node stopping", signal=name)
        self._planner.begin_shutdown()
        self._stop.set()

    async def run(self) -> int:
        """Supervise until asked to stop; return the node's exit code."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop, signum)
        try:
            async with asyncio.TaskGroup() as group:
                for name in self._commands:
                    group.create_task(self._keep_alive(name), name=f"child-{name}")
            return self._planner.exit_status()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            # Only non-empty when supervision itself failed: never leave children behind.
            for proc in self._procs.values():
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()

    async def _keep_alive(self, name: str) -> None:
        delay = 0.0
        while not self._stop.is_set():
            if delay:
                # Wait out the backoff, but wake up at once when the node is told to stop.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                if self._stop.is_set():
                    return
            proc = await self._spawn(name)
            returncode = await self._wait(name, proc)
            restart = self._planner.exited(name, returncode, self._clock())
            if restart is None:
                return
            self._log.warning(
                "child exited, restarting",
                child=name,
                returncode=returncode,
                uptime_s=round(restart.uptime, 3),
                delay_s=restart.delay,
                attempt=restart.attempt,
            )
            delay = restart.delay

    async def _spawn(self, name: str) -> asyncio.subprocess.Process:
        env = {**os.environ, SUPERVISOR_PID_ENV: str(os.getpid())}
        proc = await asyncio.create_subprocess_exec(*self._commands[name], env=env)
        self._procs[name] = proc
        self._planner.started(name, self._clock())
        self._log.info("child started", child=name, pid=proc.pid)
        return proc

    async def _wait(self, name: str, proc: asyncio.subprocess.Process) -> int:
        waiter = asyncio.ensure_future(proc.wait())
        stopper = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if not waiter.done():
            # The node is stopping: pass the signal on and give the child its grace period.
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(asyncio.shield(waiter), self._stop_timeout)
            except TimeoutError:
                self._log.error("child did not stop in time, killing", child=name, pid=proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        returncode = await waiter
        self._procs.pop(name, None)
        log = self._log.info if returncode == 0 else self._log.warning
        log("child exited", child=name, pid=proc.pid, returncode=returncode)
        return returncode
