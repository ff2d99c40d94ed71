"""Runs the containers of K3s static pod manifests under containerd with runc, as kubelet would.

Each container gets its own snapshot of the image (`ctr images mount`), an OCI spec made by
podspec.oci_spec from the manifest, and is started with `ctr run --detach --config`; exec probes
run inside it with `ctr task exec`, as kubelet's exec probes do through CRI.
"""

from __future__ import annotations

import functools
import json
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tests.harness.containerd import ContainerdDaemon
from tests.harness.logs import log_tail
from tests.harness.wait import eventually
from tests.integration.deploy.podspec import Container, Volume, image_reference, oci_spec

NAMESPACE = "k8s.io"
# How long a SIGKILLed task may take to be reaped before it is deleted by force.
KILLED_TIMEOUT = 10.0


class PodError(RuntimeError):
    """A container could not be started or stopped (the message carries ctr's output)."""


class RunningContainer:
    def __init__(self, container: Container, cid: str, rootfs: Path, log: Path) -> None:
        self.container = container
        self.id = cid
        self.rootfs = rootfs
        self.log = log

    def log_tail(self, lines: int = 20) -> str:
        return log_tail(self.log, lines, missing="")


class PodRunner:
    """Starts containers on `containerd` inside the network namespace at `netns_path`."""

    def __init__(
        self,
        containerd: ContainerdDaemon,
        work: Path,
        netns_path: str,
        image_config: dict[str, Any],
        host_path: Callable[[Volume], str],
    ) -> None:
        self.containerd = containerd
        self.work = work
        self.netns_path = netns_path
        self.image_config = image_config
        self.host_path = host_path
        self.running: list[RunningContainer] = []
        self._default_spec: dict[str, Any] = json.loads(containerd.ctr("oci", "spec"))

    def _ctr(self, *args: str, check: bool = True, timeout: float = 60.0) -> str:
        result = subprocess.run(
            self.containerd.ctr_argv(args, NAMESPACE),
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise PodError(f"ctr {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def start(self, container: Container) -> RunningContainer:
        cid = f"{container.pod}-{container.name}-{uuid.uuid4().hex[:6]}"
        rootfs = self.work / cid / "rootfs"
        rootfs.mkdir(parents=True)
        # A writable snapshot of the image per container, like CRI's; the spec makes it read-only.
        image = image_reference(container.image)
        self._ctr("images", "mount", "--rw", image, str(rootfs), timeout=120)
        log = self.work / cid / "log"
        spec = oci_spec(
            self._default_spec,
            container,
            image_config=self.image_config,
            rootfs=str(rootfs),
            # One level: runc removes the cgroup with the container, leaving no parent behind.
            cgroups_path=f"/peermirror-test-{cid}",
            netns_path=self.netns_path,
            host_path=self.host_path,
        )
        spec_file = self.work / cid / "config.json"
        spec_file.write_text(json.dumps(spec, indent=1), encoding="utf-8")
        running = RunningContainer(container, cid, rootfs, log)
        self.running.append(running)
        io = [f"--log-uri=file://{log}", f"--fifo-dir={self.work / cid / 'fifo'}"]
        self._ctr("run", "--detach", "--config", str(spec_file), *io, cid)
        return running

    def exec(self, running: RunningContainer, argv: Sequence[str], timeout: float = 30.0) -> int:
        """Exit code of `argv` run inside the container (kubelet's exec probe)."""
        exec_id = f"probe-{uuid.uuid4().hex[:8]}"
        result = subprocess.run(
            self.containerd.ctr_argv(
                ["task", "exec", "--exec-id", exec_id, running.id, *argv], NAMESPACE
            ),
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
        )
        return result.returncode

    def exec_ok(self, running: RunningContainer, argv: Sequence[str]) -> bool:
        """Whether `argv` exits 0 inside the container (a passing exec probe)."""
        return self.exec(running, argv) == 0

    def task_status(self, running: RunningContainer) -> str:
        for line in self._ctr("task", "ls", check=False).splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == running.id:
                return fields[-1]
        return "GONE"

    def stopped(self, running: RunningContainer) -> bool:
        return self.task_status(running) != "RUNNING"

    def stop_all(self) -> list[str]:
        """SIGTERM every task, wait, delete tasks, containers and snapshots; returns problems."""
        problems = []
        for running in self.running:
            self._ctr("task", "kill", "--signal", "SIGTERM", running.id, check=False)
        start = time.monotonic()
        for running in self.running:
            # kubelet's grace period, counted from the SIGTERM sent to all at once.
            grace = running.container.grace_period
            stopped = functools.partial(self.stopped, running)
            if not eventually(stopped, max(0.0, start + grace - time.monotonic()), 0.2):
                problems.append(f"{running.id} still running {grace}s after SIGTERM")
                self._ctr("task", "kill", "--signal", "SIGKILL", running.id, check=False)
                # Deleted by force below even if this runs out: the problem is already noted.
                eventually(stopped, KILLED_TIMEOUT, 0.2)
            self._ctr("task", "delete", "--force", running.id, check=False)
            self._ctr("containers", "delete", running.id, check=False)
            self._ctr("images", "unmount", "--rm", str(running.rootfs), check=False)
        mounts = Path("/proc/self/mountinfo").read_text()
        for running in self.running:
            if str(running.rootfs) in mounts:
                problems.append(f"{running.rootfs} still mounted")
            cgroups = Path("/sys/fs/cgroup").glob(f"*/*{running.id}")
            problems += [f"cgroup {c} left" for c in cgroups]
        if self._ctr("containers", "ls", "--quiet", check=False).split():
            problems.append("containers left in containerd")
        self.running.clear()
        return problems
