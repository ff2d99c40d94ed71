"""CPU time a server process has used: benchmarks sample it around timed runs, since it is a
figure other load on a shared machine disturbs far less than wall-clock rates."""

from __future__ import annotations

import psutil


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds process `pid` has used so far (its threads included)."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)
