"""CPU time a server process has used: benchmarks sample it around timed runs, since it is a
figure other load on a shared machine disturbs far less than wall-clock rates."""

from __future__ import annotations

import hashlib
import time

import psutil

from bench.report import median

MIB = 1 << 20
# Passes of a CPU microbenchmark, of which the median counts: a single pass took whatever spike
# of the shared machine passed by (bench.relay_paths' TLS floor read 0.97 to 1.75 CPU-s per GB
# in three runs of one session). Slow stretches of seconds still show.
FLOOR_PASSES = 5


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds process `pid` has used so far (its threads included)."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def sha256_s_per_gb() -> float:
    """CPU seconds per GB of SHA-256 on one core (the median of FLOOR_PASSES passes of
    512 MiB): the work of verifying every byte, the floor of any registry that relays."""
    data = bytes(64 * MIB)

    def one_pass() -> float:
        hasher = hashlib.sha256()
        started = time.process_time()
        for _ in range(8):
            hasher.update(data)
        return (time.process_time() - started) / (8 * len(data) / 1e9)

    return median([one_pass() for _ in range(FLOOR_PASSES)])
