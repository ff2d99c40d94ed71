"""Idle resident memory of each service, against the 80 MiB target and Spegel's 128 MiB limit.

Starts every service the way `peermirror <service> --config FILE` runs in production (one process,
loopback ports, OCI-layout store so no containerd is needed), waits until it answers health, lets
it idle, and reads its resident set size. A bare interpreter measured in the same run is the
baseline, so the figures say how much peermirror itself adds.

Run: `.venv/bin/python -m bench.idle_memory`. Exit code 1 when a service is over the target.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.harness.service_procs import (
    NodePorts,
    ServiceProcess,
    cli_argv,
    running,
    wait_http_ok,
    wait_serving,
    write_node_config,
)

MIB = 1024 * 1024
TARGET_MIB = 80.0
SPEGEL_LIMIT_MIB = 128.0
SERVICES = ("discovery", "registry", "pinner")


@dataclass(frozen=True)
class Sample:
    """One process's idle memory."""

    name: str
    rss_mib: float
    uss_mib: float


def measure(proc: ServiceProcess) -> tuple[float, float]:
    """RSS and USS (memory only this process holds) in MiB."""
    info = psutil.Process(proc.pid).memory_full_info()
    return info.rss / MIB, info.uss / MIB


def sample_baseline(workdir: Path, settle: float) -> Sample:
    """A bare interpreter that only sleeps: what any Python process costs."""
    argv = [sys.executable, "-c", "import time; time.sleep(600)"]
    with running(argv, workdir / "logs", "baseline") as proc:
        time.sleep(settle)
        rss, uss = measure(proc)
    return Sample("python (baseline)", rss, uss)


def sample_service(service: str, workdir: Path, settle: float) -> Sample:
    """Start `service` idle, wait until it serves, let it settle, and measure it."""
    ports = NodePorts.pick()
    config = write_node_config(workdir / service, ports)
    with running(cli_argv(service, "--config", str(config)), workdir / "logs", service) as proc:
        wait_serving(ports.grpc_address(service), proc)
        if service == "registry":
            wait_http_ok(f"{ports.registry_url}/livez")
        time.sleep(settle)
        rss, uss = measure(proc)
        proc.terminate()
    return Sample(service, rss, uss)


def sample_supervisor(workdir: Path, settle: float) -> Sample:
    """The `peermirror node` parent process alone, once its three children serve."""
    ports = NodePorts.pick()
    config = write_node_config(workdir / "node", ports)
    with running(cli_argv("node", "--config", str(config)), workdir / "logs", "node") as proc:
        for service in SERVICES:
            wait_serving(ports.grpc_address(service), proc)
        time.sleep(settle)
        rss, uss = measure(proc)
        proc.terminate()
    return Sample("node supervisor", rss, uss)


def render(samples: Sequence[Sample], baseline: Sample, supervisor: Sample) -> str:
    """The result table: absolute MiB and the ratios the project tracks."""
    header = (
        f"{'process':<18} {'RSS MiB':>8} {'USS MiB':>8} {'x baseline':>10} "
        f"{'/ 80 MiB target':>15} {'/ Spegel 128 MiB':>16}"
    )
    lines = [header, "-" * len(header)]
    for s in [baseline, *samples, supervisor]:
        lines.append(
            f"{s.name:<18} {s.rss_mib:>8.1f} {s.uss_mib:>8.1f} "
            f"{s.rss_mib / baseline.rss_mib:>10.2f} "
            f"{s.rss_mib / TARGET_MIB:>15.2f} {s.rss_mib / SPEGEL_LIMIT_MIB:>16.2f}"
        )
    # The target is per service; Spegel's limit is for its one process doing all three jobs.
    total = sum(s.rss_mib for s in samples)
    lines.append(
        f"{'three services':<18} {total:>8.1f} {'':>8} {'':>10} "
        f"{total / (TARGET_MIB * len(samples)):>15.2f} {total / SPEGEL_LIMIT_MIB:>16.2f}"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.idle_memory",
        description="Idle resident memory per peermirror service vs the 80 MiB target.",
    )
    parser.add_argument(
        "--settle", type=float, default=2.0, help="seconds to idle before measuring (default 2)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="peermirror-bench-") as tmp:
        workdir = Path(tmp)
        baseline = sample_baseline(workdir, args.settle)
        samples = [sample_service(name, workdir, args.settle) for name in SERVICES]
        supervisor = sample_supervisor(workdir, args.settle)
    print(render(samples, baseline, supervisor))
    over = [s.name for s in samples if s.rss_mib >= TARGET_MIB]
    if over:
        print(f"over the {TARGET_MIB:.0f} MiB target: {', '.join(over)}")
        return 1
    print(f"every service is under the {TARGET_MIB:.0f} MiB target")
    return 0


if __name__ == "__main__":
    sys.exit(main())
