"""peermirror's registry against the Go registry (distribution), same content, one run, loopback.

One synthetic image with a single 1 GiB layer is served by three processes at once: the Go
registry (Debian `docker-registry`, filesystem storage), peermirror's registry on an OCI layout
store, and peermirror's registry on a real containerd holding the imported image. Each is asked
for the same blob (whole-blob GET, page cache warm, timed by one small client) and the same
manifest (GET and HEAD with ApacheBench, 16 keep-alive connections). Repetitions are interleaved
across the servers so background load on the machine hits them alike. Every server's answers
are checked (status, length, digest) before anything is timed.

Targets: peermirror >= 1.0x the Go registry's blob throughput and >= 2.0x its manifest request
rate, on both store backends. The exit code is 0 whether targets are met or missed (the PASS/MISS
lines say which); it is 1 only when the benchmark itself could not run.

Run: `.venv/bin/python -m bench.registry_vs_distribution` (needs `ab`, `docker-registry` and
`containerd`: Debian packages apache2-utils, docker-registry, containerd).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.distribution_registry import lay_out_storage, registry_argv, write_config
from bench.http_load import BlobFetch, LoadError, ab_binary, fetch_blob, run_ab
from bench.process_cpu import cpu_seconds
from bench.report import median, verdict
from tests.harness.containerd import ContainerdDaemon
from tests.harness.images import BuiltImage, build_image
from tests.harness.service_procs import ServiceProcess, cli_argv, free_port, running
from tests.harness.wait import wait_for

GIB = 1 << 30
HOST = "127.0.0.1"
IMAGE_NAME = "docker.io/library/bench:1.0"
REPOSITORY = "library/bench"
TAG = "1.0"
NAMESPACE = "k8s.io"
MANIFEST_ACCEPT = ", ".join(
    (
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    )
)
BLOB_TARGET = 1.0
MANIFEST_TARGET = 2.0
START_TIMEOUT_S = 30.0
BASELINE = "docker-registry"


@dataclass
class Server:
    """One registry under test and the figures measured on it."""

    label: str
    port: int
    # peermirror needs the upstream registry named; the Go registry serves one namespace.
    query: str
    proc: ServiceProcess | None = None
    blob_gbps: list[float] = field(default_factory=list)
    get_rps: list[float] = field(default_factory=list)
    head_rps: list[float] = field(default_factory=list)
    # CPU the server process spent in the timed runs: a figure other load on the machine
    # disturbs much less than wall-clock rates.
    blob_cpu_s: float = 0.0
    blob_bytes: int = 0
    manifest_cpu_s: float = 0.0
    manifest_requests: int = 0

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far."""
        assert self.proc is not None
        return cpu_seconds(self.proc.pid)

    def manifest_target(self) -> str:
        return f"/v2/{REPOSITORY}/manifests/{TAG}{self.query}"

    def blob_target(self, digest: str) -> str:
        return f"/v2/{REPOSITORY}/blobs/{digest}{self.query}"

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"


@dataclass(frozen=True)
class Settings:
    """How much to measure."""

    blob_size: int
    blob_reps: int
    rounds: int
    seconds: float
    connections: int
    backends: tuple[str, ...]


# --- setting the servers up ----------------------------------------------------------------------


def write_peermirror_config(
    directory: Path, port: int, store: dict[str, str], tls: dict[str, Any] | None = None
) -> Path:
    """A registry-only node config: loopback, warning-level JSON logs, every registry mirrored,
    plain HTTP unless a `tls` section is given."""
    directory.mkdir(parents=True, exist_ok=True)
    registries = directory / "registries.yaml"
    registries.write_text(yaml.safe_dump({"mirrors": {"*": {}}}), encoding="utf-8")
    data = {
        "node": {"name": "bench", "data_dir": str(directory / "data")},
        "log": {"level": "warning", "format": "json"},
        "registry": {
            "host": HOST,
            "port": port,
            "grpc_address": f"{HOST}:{free_port()}",
            "registries_file": str(registries),
        },
        "tls": tls or {"enabled": False},
        "store": store,
    }
    path = directory / "peermirror.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def check_answers(server: Server, image: BuiltImage, layer_digest: str) -> None:
    """Manifest and blob come back whole and hash to their digests (blob hash: once, untimed)."""
    manifest = fetch_blob(
        HOST, server.port, server.manifest_target(), {"Accept": MANIFEST_ACCEPT}, verify=True
    )
    if manifest.status != 200 or f"sha256:{manifest.sha256}" != image.target.digest:
        raise LoadError(f"{server.label}: manifest answer wrong ({manifest.status})")
    if manifest.headers.get("content-type") != image.target.media_type:
        raise LoadError(f"{server.label}: manifest type {manifest.headers.get('content-type')}")
    blob = fetch_blob(HOST, server.port, server.blob_target(layer_digest), verify=True)
    if blob.status != 200 or f"sha256:{blob.sha256}" != layer_digest:
        raise LoadError(f"{server.label}: blob answer wrong ({blob.status})")


def wait_answering(label: str, answers: Callable[[], bool], proc: ServiceProcess) -> None:
    """Until `answers()` holds; fails early, with its output, if `proc` exits."""

    def answered() -> bool:
        try:
            return answers()
        except (OSError, LoadError):  # not listening (or not speaking TLS) yet
            return False

    wait_for(
        f"{label} answering",
        answered,
        START_TIMEOUT_S,
        0.1,
        gone=proc.exited,
        detail=lambda: str(proc.output_lines()),
    )


def manifest_answers(server: Server) -> bool:
    answer = fetch_blob(HOST, server.port, server.manifest_target(), {"Accept": MANIFEST_ACCEPT})
    return answer.status == 200


@contextlib.contextmanager
def servers(
    work: Path, image: BuiltImage, layer_digest: str, settings: Settings
) -> Iterator[list[Server]]:
    """Start every server (and containerd) on free loopback ports; all stopped on exit."""
    with contextlib.ExitStack() as stack:
        logs = work / "logs"
        started: list[Server] = []

        go = Server(BASELINE, free_port(), "")
        storage = work / "distribution"
        lay_out_storage(
            storage,
            REPOSITORY,
            TAG,
            image.target.digest,
            image.blob_paths,
            [d.digest for d in image.blobs if d.digest != image.target.digest],
        )
        config = write_config(work / "distribution.yml", storage, go.port)
        go.proc = stack.enter_context(running(registry_argv(config), logs, "docker-registry"))
        started.append(go)

        stores: list[tuple[str, dict[str, str]]] = []
        if "oci-layout" in settings.backends:
            layout = {"backend": "oci-layout", "oci_layout_path": str(image.layout_dir)}
            stores.append(("oci-layout", layout))
        if "containerd" in settings.backends:
            daemon = ContainerdDaemon()
            stack.callback(daemon.stop)
            daemon.start()
            archive = image.write_oci_archive(work / "image.tar")
            daemon.import_archive(archive, NAMESPACE, base_name=None, unpack=False)
            archive.unlink()
            stores.append(
                (
                    "containerd",
                    {
                        "backend": "containerd",
                        "containerd_address": daemon.address,
                        "containerd_namespace": NAMESPACE,
                        "content_root": str(daemon.content_root),
                    },
                )
            )
        for backend, store in stores:
            server = Server(f"peermirror {backend}", free_port(), "?ns=docker.io")
            cfg = write_peermirror_config(work / backend, server.port, store)
            server.proc = stack.enter_context(
                running(cli_argv("registry", "--config", str(cfg)), logs, f"peermirror-{backend}")
            )
            started.append(server)

        for server in started:
            assert server.proc is not None
            wait_answering(server.label, functools.partial(manifest_answers, server), server.proc)
            check_answers(server, image, layer_digest)
        yield started


# --- measuring -----------------------------------------------------------------------------------


def measure_blobs(servers_: Sequence[Server], layer_digest: str, reps: int) -> None:
    """Timed whole-blob GETs, interleaved across servers; one untimed warm-up each."""
    for server in servers_:
        fetch_blob(HOST, server.port, server.blob_target(layer_digest))
    for _ in range(reps):
        for server in servers_:
            cpu = server.cpu_seconds()
            got: BlobFetch = fetch_blob(HOST, server.port, server.blob_target(layer_digest))
            server.blob_cpu_s += server.cpu_seconds() - cpu
            if got.status != 200:
                raise LoadError(f"{server.label}: blob GET answered {got.status}")
            server.blob_gbps.append(got.gb_per_s)
            server.blob_bytes += got.body_bytes


def measure_manifests(servers_: Sequence[Server], settings: Settings) -> None:
    """ab GET and HEAD rounds, interleaved across servers, after a short warm-up each."""
    headers = {"Accept": MANIFEST_ACCEPT}

    def rate(server: Server, method: str, seconds: float) -> float:
        cpu = server.cpu_seconds()
        result = run_ab(
            server.base_url + server.manifest_target(),
            method=method,
            headers=headers,
            connections=settings.connections,
            seconds=seconds,
        )
        server.manifest_cpu_s += server.cpu_seconds() - cpu
        server.manifest_requests += result.complete
        return result.requests_per_s

    for server in servers_:
        rate(server, "GET", 1)
        server.manifest_cpu_s, server.manifest_requests = 0.0, 0
    for _ in range(settings.rounds):
        for server in servers_:
            server.get_rps.append(rate(server, "GET", settings.seconds))
            server.head_rps.append(rate(server, "HEAD", settings.seconds))


# --- reporting -----------------------------------------------------------------------------------


def render(servers_: Sequence[Server], settings: Settings) -> str:
    """The figures (medians, with the range seen), the ratios and one PASS/MISS line per target."""
    header = (
        f"{'server':<24} {'blob GB/s':>10} {'(min-max)':>13} "
        f"{'GET man. req/s':>15} {'HEAD man. req/s':>16} {'CPU s/GiB':>10} {'CPU us/req':>11}"
    )
    lines = [
        f"blob: {settings.blob_size / GIB:g} GiB, {settings.blob_reps} GETs each, page cache warm; "
        f"manifests: ab -k -c{settings.connections}, "
        f"{settings.rounds} x {settings.seconds:g} s per method; figures are medians; "
        "CPU: the server process's user+system time per GiB sent / per manifest request",
        header,
        "-" * len(header),
    ]
    for s in servers_:
        spread = f"({min(s.blob_gbps):.2f}-{max(s.blob_gbps):.2f})"
        cpu_per_gib = s.blob_cpu_s / (s.blob_bytes / GIB) if s.blob_bytes else 0.0
        cpu_per_req = 1e6 * s.manifest_cpu_s / s.manifest_requests if s.manifest_requests else 0.0
        lines.append(
            f"{s.label:<24} {median(s.blob_gbps):>10.2f} {spread:>13} "
            f"{median(s.get_rps):>15,.0f} {median(s.head_rps):>16,.0f} "
            f"{cpu_per_gib:>10.2f} {cpu_per_req:>11.0f}"
        )
    base = servers_[0]
    verdicts: list[str] = []
    for s in servers_[1:]:
        blob = median(s.blob_gbps) / median(base.blob_gbps)
        get = median(s.get_rps) / median(base.get_rps)
        head = median(s.head_rps) / median(base.head_rps)
        lines.append(
            f"{'ratio ' + s.label.removeprefix('peermirror ') + ' / ' + BASELINE:<24} "
            f"{blob:>9.2f}x {'':>13} {get:>14.2f}x {head:>15.2f}x"
        )
        for what, ratio, target in (
            ("blob throughput", blob, BLOB_TARGET),
            ("GET manifest req/s", get, MANIFEST_TARGET),
            ("HEAD manifest req/s", head, MANIFEST_TARGET),
        ):
            judged = verdict(ratio >= target)
            verdicts.append(f"{judged} {s.label}: {what} {ratio:.2f}x (target >= {target:.1f}x)")
    return "\n".join([*lines, "", *verdicts])


def run(settings: Settings) -> str:
    """Set everything up in a temp dir, measure, tear everything down; returns the report."""
    ab_binary()
    with tempfile.TemporaryDirectory(prefix="pm-bench-registry-") as tmp:
        work = Path(tmp)
        print(f"building a {settings.blob_size / GIB:g} GiB image ...", flush=True)
        image = build_image(
            work / "layout",
            IMAGE_NAME,
            layers=1,
            layer_size=settings.blob_size,
            cheap_data=True,
            compresslevel=0,
        )
        layer_digest = image.platforms[0].layers[0].descriptor.digest
        print("starting docker-registry, containerd and peermirror ...", flush=True)
        with servers(work, image, layer_digest, settings) as started:
            print("measuring blob GETs ...", flush=True)
            measure_blobs(started, layer_digest, settings.blob_reps)
            print("measuring manifest GET/HEAD ...", flush=True)
            measure_manifests(started, settings)
        return render(started, settings)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.registry_vs_distribution",
        description="peermirror's registry vs the Go registry: blob GB/s and manifest req/s.",
    )
    parser.add_argument("--blob-mib", type=int, default=1024, help="layer size (default 1024)")
    parser.add_argument("--blob-reps", type=int, default=7, help="timed blob GETs per server")
    parser.add_argument("--rounds", type=int, default=3, help="ab rounds per server and method")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one ab run")
    parser.add_argument("--connections", type=int, default=16, help="concurrent connections")
    parser.add_argument(
        "--backends",
        default="oci-layout,containerd",
        help="peermirror store backends to run (comma separated; default both)",
    )
    args = parser.parse_args(argv)
    backends = tuple(b for b in args.backends.split(",") if b)
    unknown = set(backends) - {"oci-layout", "containerd"}
    if unknown or not backends:
        parser.error(f"unknown backends: {sorted(unknown)}")
    settings = Settings(
        blob_size=args.blob_mib << 20,
        blob_reps=args.blob_reps,
        rounds=args.rounds,
        seconds=args.seconds,
        connections=args.connections,
        backends=backends,
    )
    # SIGTERM unwinds like an exception, so every server, containerd and temp dir is cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    load_before = os.getloadavg()[0]
    try:
        report = run(settings)
    except (LoadError, OSError, RuntimeError, TimeoutError) as exc:
        print(f"benchmark could not run: {exc}", file=sys.stderr)
        return 1
    print(report)
    # The figures are only as good as the machine was quiet: say how busy it was.
    print(
        f"load average (1 min) {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, "
        f"on {os.cpu_count()} CPUs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
