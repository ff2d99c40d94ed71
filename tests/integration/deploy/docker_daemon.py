"""A private Docker daemon for the deploy tests: own socket, data root and containerd.

It never touches a daemon the machine may already run, nor the host firewall: `--iptables=false`
and `--bridge=none` (every peermirror container uses the host network, and builds run with
`--network host`), so the FORWARD policy stays as found and other tests' netns meshes are
unaffected. Its data root lives under CACHE_DIR, so the image layers of one run serve the next.
dockerd starts its own containerd (its default) under its exec root, apart from the harness's.
One test session at a time owns it (a lock file), and the session that started it stops it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tests.harness.logs import log_tail
from tests.harness.wait import eventually
from tests.integration.deploy.debian_base import CACHE_DIR

RUN_DIR = Path("/run/peermirror-test")
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
# Debian's docker.io: its CLI matches the daemon; another `docker` earlier on PATH may not.
DOCKER_CLI = "/usr/bin/docker"
DOCKERD = "/usr/sbin/dockerd"


class DockerError(RuntimeError):
    """dockerd could not start, or a docker command failed (message carries its output)."""


class DockerDaemon:
    """dockerd with every path of its own, started by `start()` and gone after `stop()`."""

    def __init__(self, cache_dir: Path = CACHE_DIR, run_dir: Path = RUN_DIR) -> None:
        for binary in (DOCKERD, DOCKER_CLI):
            if not Path(binary).is_file():
                raise DockerError(f"{binary} not found: install the Debian package `docker.io`")
        self.data_root = cache_dir / "docker"
        self.run_dir = run_dir
        self.socket = run_dir / "docker.sock"
        self.exec_root = run_dir / "exec"
        self.pidfile = run_dir / "docker.pid"
        self.log_path = run_dir / "dockerd.log"
        self._lock: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    def env(self) -> dict[str, str]:
        """Environment for docker and docker-compose talking to this daemon."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        env["DOCKER_HOST"] = self.host
        return env

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.data_root.mkdir(parents=True, exist_ok=True)
        self._lock = os.open(self.run_dir / "dockerd.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
        # Another test session using the daemon: wait for it rather than share it.
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        self._kill_leftover()
        # Tied to this process (as the harness ties containerd): a killed test run takes dockerd,
        # and with it dockerd's containers and containerd, along.
        setpriv = shutil.which("setpriv")
        argv = [
            *([setpriv, "--pdeathsig", "TERM"] if setpriv else []),
            DOCKERD,
            f"--host={self.host}",
            f"--data-root={self.data_root}",
            f"--exec-root={self.exec_root}",
            f"--pidfile={self.pidfile}",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-masq=false",
            "--bridge=none",
            "--storage-driver=overlay2",
            # dockerd 20.10 uses a containerd already answering at /run/containerd (a dev box's
            # or a system Docker's) instead of starting its own: keep out of its namespaces then.
            "--containerd-namespace=peermirror-test",
            "--containerd-plugins-namespace=peermirror-test-plugins",
        ]
        log = self.log_path.open("wb")
        try:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        finally:
            log.close()
        proc = self._proc

        def answers() -> bool:
            if proc.poll() is not None:
                raise DockerError(f"dockerd exited ({proc.returncode}):\n{self.log_tail()}")
            return self.docker("version", check=False).returncode == 0

        if eventually(answers, START_TIMEOUT, interval=0.3):
            return
        raise DockerError(f"dockerd not answering after {START_TIMEOUT}s:\n{self.log_tail()}")

    def _kill_leftover(self) -> None:
        """A dockerd a crashed session left behind (we hold the lock, so nobody uses it)."""
        with contextlib.suppress(FileNotFoundError, ValueError):
            pid = int(self.pidfile.read_text().strip())
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
                _wait_gone(pid, STOP_TIMEOUT)

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines, missing="")

    def stop(self) -> None:
        """Stop dockerd (it stops its containers and its containerd), release the lock."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGTERM)
                try:
                    self._proc.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    os.killpg(self._proc.pid, signal.SIGKILL)
                    self._proc.wait()
            self._proc = None
        # dockerd leaves the host's netns bind-mounted in its exec root (libnetwork's "default"
        # sandbox): unmount whatever is mounted below it, deepest first, then remove it.
        for mount_point in sorted(_mounts_below(self.exec_root), reverse=True):
            subprocess.run(["umount", "--lazy", mount_point], capture_output=True, check=False)
        shutil.rmtree(self.exec_root, ignore_errors=True)
        leftover = _mounts_below(self.exec_root)
        if leftover:
            raise DockerError(f"mounts left under {self.exec_root}: {leftover}")
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def docker(
        self, *args: str, check: bool = True, timeout: float = 120.0, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        return self.run([DOCKER_CLI, *args], check=check, timeout=timeout, cwd=cwd)

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 120.0,
        cwd: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """A docker/docker-compose command against this daemon."""
        result = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            env=self.env(),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise DockerError(
                f"{' '.join(argv)} failed ({result.returncode}):\n"
                f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
            )
        return result

    def inspect(self, kind: str, name: str) -> dict[str, Any] | None:
        """`docker <kind> inspect name` as a dict; None when it does not exist."""
        result = self.docker(kind, "inspect", name, check=False)
        if result.returncode != 0:
            return None
        data = json.loads(result.stdout)
        return data[0] if data else None

    def __enter__(self) -> DockerDaemon:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _mounts_below(directory: Path) -> list[str]:
    """Mount points at or below `directory` (from /proc/self/mountinfo, octal escapes kept)."""
    prefix = str(directory)
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        if point == prefix or point.startswith(prefix + "/"):
            found.append(point)
    return found


def _wait_gone(pid: int, timeout: float) -> None:

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    if eventually(gone, timeout, interval=0.1):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def running_daemon() -> Iterator[DockerDaemon]:
    daemon = DockerDaemon()
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()
