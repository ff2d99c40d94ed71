"""Shared first pulls on the netns mesh (issue 13): what a wave of nodes pulling a new image at
once costs the upstream, and how long it takes, against one node pulling it alone, in one run.

Six real nodes (namespaces, one containerd each, discovery, registry and pinner each; see
tests/harness/mesh.py) and a Debian `docker-registry` in a namespace of its own as the upstream
of `registry.test:5000`. For each wave size (3 and 5 by default) a new synthetic 4-layer image
(512 MiB by default) is pushed to the upstream and pulled through CRI (kubelet's path) by that
many nodes released by one barrier. The baseline, per wave, is one more new image of the same
size pulled by one node alone straight from the upstream: its registry is stopped for that pull,
so containerd's mirror endpoint is refused at once and it goes to the upstream itself.

Figures: upstream bytes (iptables counter in the upstream's namespace) over the image size, and
the wave's median pull time over the baseline's. Targets (issue 13): bytes <= 1.05x the image,
median pull time <= 1.25x the baseline. Also the machine's CPU time (all processes, from
/proc/stat) during the baseline and the wave, and the floor it sets: every node of a wave unpacks
and stores the whole image as the lone node does, and all nodes share this machine's cores, so a
wave of N cannot take less than N x (CPU-seconds of the lone pull) / cores. And the CPU-seconds
per GB of image each wave node's registry, containerd and discovery spent (per process, so far
less disturbed by other load than the machine's figures). Exit 0 whether
targets are met or missed (the PASS/MISS lines say which); 1 only when the benchmark itself could
not run. Everything is torn down.

Run as root: `.venv/bin/python -m bench.first_pull [--waves 3,5] [--image-mib 512]`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.p2p_mesh import process_cpu_s
from tests.harness.first_pull_wave import (
    Upstream,
    image_bytes,
    pull_together,
    push_new_image,
    start_counted_upstream,
)
from tests.harness.mesh import Mesh, MeshError, MeshNode
from tests.harness.mesh_p2p import FAST_TIMINGS

BYTES_TARGET = 1.05
TIME_TARGET = 1.25
LAYERS = 4
# Processes of a wave node whose CPU per GB is printed: the registry's is what the wave adds.
SERVICES = ("registry", "containerd", "discovery")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent not idle since boot (/proc/stat's cpu line)."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle, iowait = fields[3], fields[4]
    return (sum(fields[:8]) - idle - iowait) / os.sysconf("SC_CLK_TCK")


def wave_processes(nodes: Sequence[MeshNode]) -> dict[tuple[str, str], int | None]:
    """Each pulling node's processes whose CPU the wave's figures break down."""
    processes: dict[tuple[str, str], int | None] = {}
    for node in nodes:
        processes[(node.name, "registry")] = node.services["registry"].pid
        processes[(node.name, "containerd")] = node.containerd.pid
        processes[(node.name, "discovery")] = node.services["discovery"].pid
    return processes


def alone_from_upstream(
    mesh: Mesh, upstream: Upstream, scratch: Path, layer_size: int
) -> tuple[float, float]:
    """Seconds one node takes to pull a new image straight from the upstream (its own registry
    stopped, so containerd's mirror endpoint is refused and it goes upstream at once), and the
    machine's CPU seconds meanwhile."""
    node = mesh.nodes[-1]
    image = push_new_image(upstream, scratch, "alone", layer_size=layer_size)
    node.stop_service("registry")
    cpu = busy_cpu_seconds()
    try:
        (outcome,) = pull_together([node], image.name)
        cpu = busy_cpu_seconds() - cpu
    finally:
        node.start_service("registry")
    if outcome.error is not None:
        raise MeshError(f"baseline pull failed: {outcome.error}")
    return outcome.seconds, cpu


def run(waves: Sequence[int], layer_size: int) -> int:
    nodes = max(waves) + 1
    with (
        tempfile.TemporaryDirectory(prefix="pm-bench-first-pull-") as tmp,
        Mesh(nodes, overrides=FAST_TIMINGS) as mesh,
    ):
        upstream = start_counted_upstream(mesh)
        scratch = Path(tmp)
        size_mib = LAYERS * layer_size / 2**20
        print(
            f"mesh of {nodes} nodes, upstream docker-registry, "
            f"{LAYERS}-layer {size_mib:.0f} MiB images"
        )
        for wave in waves:
            baseline, alone_cpu = alone_from_upstream(
                mesh, upstream, scratch / f"alone{wave}", layer_size
            )
            image = push_new_image(
                upstream, scratch / f"wave{wave}", f"wave{wave}", layer_size=layer_size
            )
            pulling = mesh.nodes[:wave]
            processes = wave_processes(pulling)
            before, cpu = upstream.sent.read(), busy_cpu_seconds()
            spent = {name: process_cpu_s(pid) for name, pid in processes.items()}
            outcomes = pull_together(pulling, image.name)
            cpu = busy_cpu_seconds() - cpu
            spent = {name: process_cpu_s(pid) - spent[name] for name, pid in processes.items()}
            failed = [o for o in outcomes if o.error is not None]
            if failed:
                print(f"wave of {wave}: pulls failed: {failed}")
                return 1
            sent = (upstream.sent.read() - before) / image_bytes(image)
            median = statistics.median(o.seconds for o in outcomes)
            ratio = median / baseline
            print(
                f"wave of {wave}: pull times {', '.join(f'{o.seconds:.1f}' for o in outcomes)} s; "
                f"one node alone from upstream {baseline:.1f} s"
            )
            print(
                f"{verdict(sent <= BYTES_TARGET)} {wave} nodes: "
                f"upstream sent {sent:.2f}x the image "
                f"(target <= {BYTES_TARGET}x)"
            )
            print(
                f"{verdict(ratio <= TIME_TARGET)} {wave} nodes: median pull {ratio:.2f}x one node "
                f"alone from upstream (target <= {TIME_TARGET}x)"
            )
            cores = os.cpu_count() or 1
            floor = max(1.0, wave * alone_cpu / cores / baseline)
            print(
                f"     CPU: the lone pull used {alone_cpu:.1f} CPU-s ({alone_cpu / baseline:.2f} "
                f"cores), the wave {cpu:.1f} CPU-s ({cpu / max(o.seconds for o in outcomes):.2f} "
                f"cores of {cores}); CPU floor for {wave} nodes on this machine: {floor:.2f}x"
            )
            gigabytes = image_bytes(image) / 1e9
            per_gb = {
                service: sum(s for (_, svc), s in spent.items() if svc == service)
                / wave
                / gigabytes
                for service in SERVICES
            }
            print(
                "     CPU-s per GB of image per node in the wave: "
                + ", ".join(f"{service} {per_gb[service]:.2f}" for service in SERVICES)
            )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waves", default="3,5", help="wave sizes, comma-separated (default 3,5)")
    parser.add_argument(
        "--image-mib", type=int, default=512, help="image size in MiB (default 512)"
    )
    args = parser.parse_args(argv)
    waves = [int(w) for w in args.waves.split(",") if w]
    try:
        return run(waves, args.image_mib * 2**20 // LAYERS)
    except MeshError as exc:
        print(f"bench.first_pull could not run: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
