"""Runs a root-only (netns) benchmark: refuses without root, tears down on SIGTERM, prints the
report with how long it took and how loaded the shared machine was."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable

from bench.http_load import LoadError
from tests.harness.mesh import MeshError


def run_as_root(measure: Callable[[], str]) -> int:
    """Print `measure()`'s report; 1 (with the reason on stderr) when it could not run."""
    if os.geteuid() != 0:
        print("benchmark could not run: needs root (network namespaces)", file=sys.stderr)
        return 1
    # SIGTERM unwinds like an exception, so the mesh is torn down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    try:
        report = measure()
    except (LoadError, MeshError, OSError, RuntimeError, TimeoutError, AssertionError) as exc:
        print(f"benchmark could not run: {exc}", file=sys.stderr)
        return 1
    print(report)
    print(
        f"took {time.monotonic() - started:.0f} s; load average (1 min) {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after, on {os.cpu_count()} CPUs"
    )
    return 0
