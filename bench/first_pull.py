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

Each node's processes sit in a cgroup of their own (tests/harness/cpu_cgroup.py), which counts
the CPU each node spent: a wave node's CPU over the lone node's is the overhead sharing costs a
node. With `--node-cpus C` every node (the lone one too) is also capped at C cores, so each node
is a machine of C cores of its own rather than a share of cores all nodes contend for, as on a
real cluster; the pull-time target is then judged on that emulation as well. With
`--upstream-mbit M` the upstream's namespace sends at most M Mbit/s (tc), shared by all nodes as
a cluster's internet link is: what a wave then saves is the link's time, not only its bytes.

Before each measured pull (the baseline and the wave alike) the bench touches and frees enough
memory for that pull's writes, and for the whole run it holds off the VM kernel's free page
reporting (restored after) so those pages stay backed: this VM backs guest memory lazily, and a
first touch costs the toucher several times what the write itself does (bench/guest_memory.py);
without both, whichever pull grows the page cache into new memory looks slower. The header
prints what a touch cost and what was done to reporting.

With `--tls` the nodes talk mutual TLS, to each other and to their containerd (the production
default; without it, plain HTTP): a waiter then decrypts, hashes and re-encrypts what it relays,
and the holder encrypts every byte once per peer instead of handing its spool to `sendfile`.

Run as root: `.venv/bin/python -m bench.first_pull [--waves 3,5] [--image-mib 512]
[--node-cpus 0.3] [--upstream-mbit 200] [--tls]`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import guest_memory
from bench.process_cpu import cpu_seconds
from bench.report import verdict
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
# Discovery at its defaults: the tests' fast timings republish every 3 s and probe every second,
# CPU a wave's nodes would spend that no production node does. The registry's budgets stay
# widened for this shared machine (see FAST_TIMINGS).
TIMINGS = {section: keys for section, keys in FAST_TIMINGS.items() if section != "discovery"}


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent not idle since boot (/proc/stat's cpu line)."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle, iowait = fields[3], fields[4]
    return (sum(fields[:8]) - idle - iowait) / os.sysconf("SC_CLK_TCK")


@dataclass
class Pulls:
    """What a set of simultaneous pulls took: seconds per node, the machine's CPU seconds, and
    each pulling node's own CPU seconds (its cgroup)."""

    seconds: list[float]
    machine_cpu: float
    node_cpu: list[float]
    # CPU seconds of each of SERVICES, summed over the pulling nodes.
    service_cpu: dict[str, float]


def service_pids(node: MeshNode) -> list[tuple[str, int]]:
    """The node's processes among SERVICES that run (the lone node's registry is stopped)."""
    pids = {
        "registry": node.services["registry"].pid,
        "containerd": node.containerd.pid,
        "discovery": node.services["discovery"].pid,
    }
    return [(service, pid) for service, pid in pids.items() if pid is not None]


def timed_pulls(mesh: Mesh, nodes: Sequence[MeshNode], ref: str) -> Pulls:
    groups = [mesh.cgroups[n.name] for n in nodes]
    pids = [entry for n in nodes for entry in service_pids(n)]
    node_cpu = [g.cpu_seconds() for g in groups]
    process_cpu = [cpu_seconds(pid) for _, pid in pids]
    machine_cpu = busy_cpu_seconds()
    outcomes = pull_together(nodes, ref)
    machine_cpu = busy_cpu_seconds() - machine_cpu
    node_cpu = [g.cpu_seconds() - c for g, c in zip(groups, node_cpu, strict=True)]
    service_cpu = dict.fromkeys(SERVICES, 0.0)
    for (service, pid), before in zip(pids, process_cpu, strict=True):
        service_cpu[service] += cpu_seconds(pid) - before
    failed = [o for o in outcomes if o.error is not None]
    if failed:
        raise MeshError(f"pulls failed: {failed}")
    return Pulls([o.seconds for o in outcomes], machine_cpu, node_cpu, service_cpu)


def new_image_pulled(
    mesh: Mesh,
    nodes: Sequence[MeshNode],
    upstream: Upstream,
    scratch: Path,
    layer_size: int,
    warm: float,
) -> tuple[Pulls, int, float]:
    """A new image pushed to the upstream and pulled by `nodes` at once, `warm` GiB of memory
    touched first: the pulls, the image's bytes, and what the upstream sent for them in
    images."""
    image = push_new_image(upstream, scratch, scratch.name, layer_size=layer_size)
    size = image_bytes(image)
    before = upstream.sent.read()
    guest_memory.touch(warm)
    pulls = timed_pulls(mesh, nodes, image.name)
    return pulls, size, (upstream.sent.read() - before) / size


def alone_from_upstream(
    mesh: Mesh, upstream: Upstream, scratch: Path, layer_size: int, warm: float
) -> Pulls:
    """One node pulling a new image straight from the upstream: its own registry stopped, so
    containerd's mirror endpoint is refused and it goes upstream at once."""
    node = mesh.nodes[-1]
    image = push_new_image(upstream, scratch, "alone", layer_size=layer_size)
    node.stop_service("registry")
    try:
        guest_memory.touch(warm)
        return timed_pulls(mesh, [node], image.name)
    finally:
        node.start_service("registry")
        mesh.regroup()


def warm_gib(wave: int, image_gib: float) -> float:
    """Memory to touch before a pull of a wave of `wave` (and before its baseline): each node
    writes the image twice (content store, snapshot), the lease holder once more (spool)."""
    return (2 * wave + 1) * image_gib + 1.0


def run(
    waves: Sequence[int],
    layer_size: int,
    node_cpus: float | None,
    upstream_mbit: float | None,
    tls: bool = False,
) -> int:
    nodes = max(waves) + 1
    with (
        guest_memory.freed_pages_kept() as reporting,
        tempfile.TemporaryDirectory(prefix="pm-bench-first-pull-") as tmp,
        Mesh(nodes, overrides=TIMINGS, tls=tls) as mesh,
    ):
        upstream = start_counted_upstream(mesh)
        if upstream_mbit is not None:
            upstream.host.limit_egress(upstream_mbit)
        mesh.cap_cpu(node_cpus)
        scratch = Path(tmp)
        size_mib = LAYERS * layer_size / 2**20
        cores = os.cpu_count() or 1
        sizing = (
            f"each node capped at {node_cpus:g} cores"
            if node_cpus is not None
            else f"all nodes sharing {cores} cores"
        )
        link = (
            f"the upstream's link held to {upstream_mbit:g} Mbit/s"
            if upstream_mbit is not None
            else "the upstream's link not limited"
        )
        wire = (
            "mutual TLS between nodes and from containerd (the default)"
            if tls
            else "plain HTTP between nodes and from containerd"
        )
        print(
            f"mesh of {nodes} nodes, upstream docker-registry, "
            f"{LAYERS}-layer {size_mib:.0f} MiB images; {sizing}; {link}; {wire}"
        )
        (touched, first), (_, again) = [
            guest_memory.touch(warm_gib(max(waves), size_mib / 1024)) for _ in range(2)
        ]
        print(
            f"memory: touching {touched:.1f} GiB took {first / max(touched, 1e-9):.2f} s/GiB, "
            f"again {again / max(touched, 1e-9):.2f} s/GiB; each measured pull is preceded by "
            "such a touch (bench/guest_memory.py says why)"
        )
        print(f"memory: {reporting}")
        for wave in waves:
            warm = warm_gib(wave, size_mib / 1024)
            alone = alone_from_upstream(mesh, upstream, scratch / f"alone{wave}", layer_size, warm)
            baseline = alone.seconds[0]
            pulls, size, sent = new_image_pulled(
                mesh, mesh.nodes[:wave], upstream, scratch / f"wave{wave}", layer_size, warm
            )
            ratio = statistics.median(pulls.seconds) / baseline
            node_ratio = statistics.median(pulls.node_cpu) / alone.node_cpu[0]
            print(
                f"wave of {wave}: pull times {', '.join(f'{t:.1f}' for t in pulls.seconds)} s; "
                f"one node alone from upstream {baseline:.1f} s"
            )
            print(
                f"{verdict(sent <= BYTES_TARGET)} {wave} nodes: "
                f"upstream sent {sent:.2f}x the image "
                f"(target <= {BYTES_TARGET}x)"
            )
            print(
                f"{verdict(ratio <= TIME_TARGET)} {wave} nodes ({sizing}): median pull "
                f"{ratio:.2f}x one node alone from upstream (target <= {TIME_TARGET}x)"
            )
            print(
                f"     node CPU: the lone node {alone.node_cpu[0]:.1f} CPU-s; wave nodes "
                f"{', '.join(f'{c:.1f}' for c in pulls.node_cpu)} CPU-s, median "
                f"{node_ratio:.2f}x the lone node's"
            )
            gigabytes = size / 1e9
            for label, of, nodes_in in (("the wave", pulls, wave), ("the lone node", alone, 1)):
                print(
                    f"     CPU-s per GB of image per node, {label}: "
                    + ", ".join(
                        f"{service} {of.service_cpu[service] / nodes_in / gigabytes:.2f}"
                        for service in SERVICES
                    )
                )
            if node_cpus is None:
                floor = max(1.0, wave * alone.machine_cpu / cores / baseline)
                print(
                    f"     machine CPU: the lone pull {alone.machine_cpu:.1f} CPU-s "
                    f"({alone.machine_cpu / baseline:.2f} cores), the wave "
                    f"{pulls.machine_cpu:.1f} CPU-s "
                    f"({pulls.machine_cpu / max(pulls.seconds):.2f} cores of {cores}); "
                    f"CPU floor for {wave} nodes sharing this machine: {floor:.2f}x"
                )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waves", default="3,5", help="wave sizes, comma-separated (default 3,5)")
    parser.add_argument(
        "--image-mib", type=int, default=512, help="image size in MiB (default 512)"
    )
    parser.add_argument(
        "--node-cpus",
        type=float,
        default=None,
        help="cap every node at this many cores (default: no cap, all nodes share the machine)",
    )
    parser.add_argument(
        "--upstream-mbit",
        type=float,
        default=None,
        help=(
            "hold the upstream's link to this many Mbit/s, shared by every node as a "
            "cluster's internet link is (default: not limited)"
        ),
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="run the mesh over mutual TLS, as production nodes do (default: plain HTTP)",
    )
    args = parser.parse_args(argv)
    waves = [int(w) for w in args.waves.split(",") if w]
    if args.node_cpus is not None and args.node_cpus <= 0:
        parser.error("--node-cpus must be positive")
    if args.upstream_mbit is not None and not args.upstream_mbit > 0:
        parser.error("--upstream-mbit must be positive")
    try:
        return run(
            waves, args.image_mib * 2**20 // LAYERS, args.node_cpus, args.upstream_mbit, args.tls
        )
    except MeshError as exc:
        print(f"bench.first_pull could not run: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
