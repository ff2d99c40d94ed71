"""A first-pull wave on slow node links, with and without a bound on waiters per fetch.

Every waiter relays a blob in flight from the node fetching it, so that node's uplink carries a
copy per waiter; `inflight.max_waiters_per_fetch: B` lets the next node fetch too once a holder
has B waiters. This bench shows what that does where node links are the bottleneck: N real
netns nodes (containerd each, CRI) whose links are held to `--node-mbit` both ways (tc on each
end of their veth), the upstream (a Debian docker-registry in its own namespace) not limited,
each wave pulling a new 4-layer image at once. Three waves, each a new image, in one run:

- without peermirror: every node's registry stopped, so each containerd pulls from the upstream
  itself (the baseline);
- no bound (the default): each blob fetched once, its holder serving every other node;
- bound B: a mesh whose nodes run with `inflight.max_waiters_per_fetch: B`.

Printed: each wave's median pull time and upstream bytes (an iptables counter in the upstream's
namespace), both as ratios to the baseline. No target: an issue sets none for this; the
figures say when the bound pays.

Run as root: `.venv/bin/python -m bench.bounded_fanout [--nodes 5] [--bound 1] [--node-mbit 100]
[--image-mib 128]`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import guest_memory
from bench.first_pull import LAYERS, TIMINGS, new_image_pulled, warm_gib
from bench.root_run import run_as_root
from tests.harness.first_pull_wave import (
    Upstream,
    start_counted_upstream,
)
from tests.harness.mesh import Mesh

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Wave:
    """One wave's outcome: its median pull time and what the upstream sent, in images."""

    label: str
    median_s: float
    upstream_images: float


def _prepared(mesh: Mesh, node_mbit: float) -> Upstream:
    """The mesh's counted upstream, every node's link held to `node_mbit` both ways."""
    upstream = start_counted_upstream(mesh)
    for node in mesh.nodes:
        node.limit_egress(node_mbit)
        mesh.limit_ingress(node, node_mbit)
    mesh.cap_cpu(None)  # a cgroup per node (not capped), which timed_pulls reads
    return upstream


def _wave(label: str, mesh: Mesh, upstream: Upstream, image_mib: int, scratch: Path) -> Wave:
    warm = warm_gib(len(mesh.nodes), image_mib / 1024)
    pulls, _, sent = new_image_pulled(
        mesh, mesh.nodes, upstream, scratch / label, image_mib * MIB // LAYERS, warm
    )
    return Wave(label, statistics.median(pulls.seconds), sent)


def run(nodes: int, bound: int, node_mbit: float, image_mib: int) -> list[Wave]:
    waves: list[Wave] = []
    with (
        guest_memory.freed_pages_kept() as reporting,
        tempfile.TemporaryDirectory(prefix="pm-bench-fanout-") as tmp,
    ):
        print(
            f"{nodes} netns nodes, each node's link held to {node_mbit:g} Mbit/s both ways, the "
            f"upstream's not limited; {LAYERS}-layer {image_mib} MiB images, a new one per wave"
        )
        print(f"memory: {reporting}")
        scratch = Path(tmp)
        with Mesh(nodes, overrides=TIMINGS) as mesh:
            upstream = _prepared(mesh, node_mbit)
            for node in mesh.nodes:
                node.stop_service("registry")
            waves.append(_wave("without", mesh, upstream, image_mib, scratch))
            for node in mesh.nodes:
                node.start_service("registry")
            mesh.regroup()
            waves.append(_wave("unbounded", mesh, upstream, image_mib, scratch))
        bounded = {**TIMINGS, "inflight": {"max_waiters_per_fetch": bound}}
        with Mesh(nodes, overrides=bounded) as mesh:
            upstream = _prepared(mesh, node_mbit)
            waves.append(_wave(f"bound{bound}", mesh, upstream, image_mib, scratch))
    return waves


def render(waves: Sequence[Wave], bound: int) -> str:
    baseline = waves[0]
    names = {
        "without": "without peermirror (each node from upstream)",
        "unbounded": "peermirror, no bound (default)",
        f"bound{bound}": f"peermirror, max_waiters_per_fetch {bound}",
    }
    lines = [f"{'wave':<48}{'median pull':>12}{'vs without':>12}{'upstream':>10}"]
    for wave in waves:
        ratio = wave.median_s / baseline.median_s
        lines.append(
            f"{names[wave.label]:<48}{wave.median_s:>10.1f} s{ratio:>11.2f}x"
            f"{wave.upstream_images:>9.2f}x"
        )
    unbounded, bounded = waves[1], waves[2]
    lines.append(
        f"bounded / unbounded median pull: {bounded.median_s / unbounded.median_s:.2f}x; "
        f"upstream bytes {bounded.upstream_images:.2f}x against {unbounded.upstream_images:.2f}x "
        "the image"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--nodes", type=int, default=5, help="nodes per wave (default 5)")
    parser.add_argument("--bound", type=int, default=1, help="max_waiters_per_fetch (default 1)")
    parser.add_argument(
        "--node-mbit",
        type=float,
        default=100.0,
        help="each node's link both ways, Mbit/s (default 100)",
    )
    parser.add_argument("--image-mib", type=int, default=128, help="image size (default 128)")
    args = parser.parse_args(argv)
    if args.nodes < 2 or args.bound < 1 or not args.node_mbit > 0 or args.image_mib < LAYERS:
        parser.error("need --nodes >= 2, --bound >= 1, --node-mbit > 0, --image-mib >= 4")

    return run_as_root(
        lambda: render(run(args.nodes, args.bound, args.node_mbit, args.image_mib), args.bound)
    )


if __name__ == "__main__":
    sys.exit(main())
