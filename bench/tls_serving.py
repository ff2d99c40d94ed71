"""What mutual TLS costs the registry when it serves a blob, against plain HTTP in the same run.

TLS is the product default on port 6443, so a slow TLS path slows every pull through the mirror,
yet the other benchmarks run plain HTTP (docker-registry and the netns mesh have no cluster CA).
This one starts two peermirror registries on the same OCI-layout store, one with `tls.enabled`
and a node certificate from a fresh cluster CA, one without, and times interleaved whole-blob GETs
of one layer from each (the TLS client presents a node certificate, as a peer or containerd
would). It prints GB/s and the server's CPU-seconds per GB for both, and their ratios. No issue
sets a target for it; it guards the TLS path (it once fell back to 16 KiB reads: 0.07 GB/s).

Run: `.venv/bin/python -m bench.tls_serving` (no root needed).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import signal
import ssl
import statistics
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.http_load import LoadError, fetch_blob
from bench.process_cpu import cpu_seconds
from bench.registry_vs_distribution import wait_answering, write_peermirror_config
from services.common import pki
from services.common.tls import TlsFiles, client_context
from tests.harness.images import BuiltImage, build_image
from tests.harness.service_procs import ServiceProcess, cli_argv, free_port, running

HOST = "127.0.0.1"
IMAGE = "docker.io/library/tls-bench:1"
MIB = 1 << 20


@dataclass
class Side:
    """One registry (plain or TLS) and what was measured on it."""

    label: str
    port: int
    tls: ssl.SSLContext | None
    proc: ServiceProcess | None = None
    gbps: list[float] = field(default_factory=list)
    cpu_s: float = 0.0
    moved: int = 0

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        return cpu_seconds(self.proc.pid)

    def fetch(self, target: str, *, verify: bool = False) -> tuple[int, str | None, float, int]:
        got = fetch_blob(HOST, self.port, target, tls=self.tls, verify=verify)
        return got.status, got.sha256, got.gb_per_s, got.body_bytes

    def answers(self, target: str) -> bool:
        return self.fetch(target)[0] == 200


def issue_files(directory: Path) -> TlsFiles:
    """A fresh cluster CA and one node certificate for the loopback address."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca = pki.create_ca()
    node = pki.issue_node(ca, "bench", HOST)
    pki.write_node(directory, node, ca.cert)
    return TlsFiles.in_directory(directory)


@contextlib.contextmanager
def registries(work: Path, image: BuiltImage, target: str) -> Iterator[list[Side]]:
    """Both registries started and answering `target`; stopped on exit."""
    files = issue_files(work / "tls")
    tls_section = {
        "enabled": True,
        "ca_file": str(files.ca_file),
        "cert_file": str(files.cert_file),
        "key_file": str(files.key_file),
    }
    store = {"backend": "oci-layout", "oci_layout_path": str(image.layout_dir)}
    sides = [Side("plain HTTP", free_port(), None), Side("mutual TLS", free_port(), None)]
    sides[1].tls = client_context(files)
    with contextlib.ExitStack() as stack:
        for side, tls in zip(sides, (None, tls_section), strict=True):
            name = "tls" if tls else "plain"
            cfg = write_peermirror_config(work / name, side.port, store, tls)
            argv = cli_argv("registry", "--config", str(cfg))
            side.proc = stack.enter_context(running(argv, work / "logs", f"registry-{name}"))
        for side in sides:
            assert side.proc is not None
            wait_answering(side.label, functools.partial(side.answers, target), side.proc)
        yield sides


def measure(sides: Sequence[Side], target: str, digest: str, reps: int) -> None:
    for side in sides:
        status, sha256, _, _ = side.fetch(target, verify=True)
        if status != 200 or f"sha256:{sha256}" != digest:
            raise LoadError(f"{side.label}: answered {status}, sha256 {sha256}")
    for _ in range(reps):
        for side in sides:
            cpu = side.cpu_seconds()
            status, _, gbps, moved = side.fetch(target)
            side.cpu_s += side.cpu_seconds() - cpu
            if status != 200:
                raise LoadError(f"{side.label}: answered {status}")
            side.gbps.append(gbps)
            side.moved += moved


def render(sides: Sequence[Side], blob_bytes: int) -> str:
    plain, tls = sides
    rows = []
    for side in sides:
        per_gb = side.cpu_s / (side.moved / 1e9)
        rows.append(
            f"{side.label:<12} {statistics.median(side.gbps):6.2f} GB/s "
            f"({min(side.gbps):.2f}-{max(side.gbps):.2f}, n={len(side.gbps)})   "
            f"server {per_gb:5.2f} CPU-s per GB"
        )
    speed = statistics.median(tls.gbps) / statistics.median(plain.gbps)
    cost = (tls.cpu_s / tls.moved) / (plain.cpu_s / plain.moved)
    return "\n".join(
        [
            f"one {blob_bytes / MIB:.0f} MiB blob from an OCI-layout store, whole-blob GETs, "
            "interleaved; medians (min-max)",
            *rows,
            f"mutual TLS: {speed:.2f}x the throughput of plain HTTP, {cost:.1f}x its server CPU "
            "per GB (no target; plain HTTP uses sendfile, TLS encrypts every byte)",
        ]
    )


def run(blob_mib: int, reps: int) -> str:
    with tempfile.TemporaryDirectory(prefix="pm-bench-tls-") as tmp:
        work = Path(tmp)
        image = build_image(
            work / "layout",
            IMAGE,
            layers=1,
            layer_size=blob_mib * MIB,
            cheap_data=True,
            compresslevel=0,
        )
        layer = image.platforms[0].layers[0].descriptor
        target = f"/v2/library/tls-bench/blobs/{layer.digest}?ns=docker.io"
        with registries(work, image, target) as sides:
            measure(sides, target, layer.digest, reps)
        return render(sides, layer.size)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tls_serving", description=__doc__)
    parser.add_argument("--blob-mib", type=int, default=256, help="size of the blob")
    parser.add_argument("--reps", type=int, default=5, help="timed GETs per side")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        print(run(args.blob_mib, args.reps))
    except (LoadError, OSError, RuntimeError, TimeoutError) as exc:
        print(f"benchmark could not run: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
