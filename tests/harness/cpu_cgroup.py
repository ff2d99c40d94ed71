"""A CPU cap and CPU accounting for one mesh node's processes, through a cgroup (v1 or v2).

Every node of a netns mesh shares this machine's cores, so a wave of N nodes pulling at once is
slower than N machines would be for a reason no cluster has. Capping each node at the same share
of a core, the lone node of a baseline included, makes each node a machine of its own size, and
the cgroup's accounting says how much CPU each node spent.

Processes join by pid; their later children inherit the group, so a node joins once its
long-running processes (containerd, the services) are up, and again after any of them restarts.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

V2_ROOT = Path("/sys/fs/cgroup")
V1_CPU = Path("/sys/fs/cgroup/cpu")
V1_CPUACCT = Path("/sys/fs/cgroup/cpuacct")
# The CFS period the cap is expressed in (100 ms, the kernel's default).
PERIOD_US = 100_000


class CgroupError(RuntimeError):
    """No cgroup CPU controller to use here, or the kernel refused a write."""


def _v2_has_cpu() -> bool:
    try:
        return "cpu" in (V2_ROOT / "cgroup.controllers").read_text().split()
    except OSError:
        return False


class CpuCgroup:
    """One cgroup `name` with a cap of `cpus` cores (None: accounting only)."""

    def __init__(self, name: str, cpus: float | None = None) -> None:
        if cpus is not None and cpus <= 0:
            raise ValueError("cpus must be positive")
        self.cpus = cpus
        if _v2_has_cpu():
            self.v2 = True
            self.dirs = [V2_ROOT / name]
        elif (V1_CPU / "cpu.cfs_quota_us").exists() and (V1_CPUACCT / "cpuacct.usage").exists():
            self.v2 = False
            self.dirs = [V1_CPU / name, V1_CPUACCT / name]
        else:
            raise CgroupError("no cgroup CPU controller (v2 'cpu' or v1 cpu + cpuacct) here")

    def create(self) -> CpuCgroup:
        if self.v2:
            # The cpu controller must be on for the root's children.
            with contextlib.suppress(OSError):
                (V2_ROOT / "cgroup.subtree_control").write_text("+cpu")
        for directory in self.dirs:
            directory.mkdir(exist_ok=True)
        if self.cpus is not None:
            quota = max(1000, int(self.cpus * PERIOD_US))
            if self.v2:
                self._write(self.dirs[0] / "cpu.max", f"{quota} {PERIOD_US}")
            else:
                self._write(self.dirs[0] / "cpu.cfs_period_us", str(PERIOD_US))
                self._write(self.dirs[0] / "cpu.cfs_quota_us", str(quota))
        return self

    def quota_cpus(self) -> float | None:
        """The cap as the kernel holds it, in cores (None: no cap)."""
        if self.v2:
            quota, period = (self.dirs[0] / "cpu.max").read_text().split()
            return None if quota == "max" else int(quota) / int(period)
        quota_us = int((self.dirs[0] / "cpu.cfs_quota_us").read_text())
        period_us = int((self.dirs[0] / "cpu.cfs_period_us").read_text())
        return None if quota_us < 0 else quota_us / period_us

    def enter(self, pids: list[int]) -> int:
        """Moves `pids` (and so their future children) into the group; returns how many moved
        (a process that ended meanwhile is skipped)."""
        moved = 0
        for pid in pids:
            try:
                for directory in self.dirs:
                    (directory / "cgroup.procs").write_text(str(pid))
            except ProcessLookupError:  # ESRCH: it ended meanwhile
                continue
            except OSError as exc:
                raise CgroupError(f"cannot move {pid} into {self.dirs[0]}: {exc}") from exc
            moved += 1
        return moved

    def pids(self) -> list[int]:
        text = (self.dirs[0] / "cgroup.procs").read_text()
        return [int(p) for p in text.split()]

    def cpu_seconds(self) -> float:
        """CPU time the group's processes (alive or ended) have used since it was created."""
        if self.v2:
            for line in (self.dirs[0] / "cpu.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    return int(value) / 1e6
            raise CgroupError(f"no usage_usec in {self.dirs[0] / 'cpu.stat'}")
        return int((self.dirs[1] / "cpuacct.usage").read_text()) / 1e9

    def remove(self) -> None:
        """Moves whatever is left back to the root group and deletes the group."""
        for directory in self.dirs:
            if not directory.exists():
                continue
            parent = directory.parent / "cgroup.procs"
            for pid in (directory / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    parent.write_text(pid)
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(directory)

    def _write(self, path: Path, value: str) -> None:
        try:
            path.write_text(value)
        except OSError as exc:
            raise CgroupError(f"cannot write {value!r} to {path}: {exc}") from exc
