"""A lease holder lost in the middle of a shared first pull: every other node's pull completes.

Three nodes pull a new image at once; the upstream's link is slowed (tc tbf in its namespace) so
the fetch is still running when the node fetching the largest layer for the cluster is killed:
its services and containerd get SIGKILL and its address is dropped. The others take the lease
over or resume from the upstream; the upstream sends at most 2.1x the image in all.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.registry.inflight.spool import spool_file_name
from tests.harness.first_pull_wave import (
    PullOutcome,
    Upstream,
    image_bytes,
    pull_together,
    push_new_image,
    start_counted_upstream,
)
from tests.harness.fixtures_mesh import running_mesh
from tests.harness.mesh import SERVICES, Mesh, MeshNode
from tests.harness.mesh_p2p import FAST_TIMINGS, SEED_TIMEOUT, assert_holds_verified
from tests.harness.wait import eventually

pytestmark = pytest.mark.containerd

LAYER_SIZE = 32 * 1024 * 1024  # a 128 MiB image: long enough to die in, at the rate below
UPSTREAM_RATE = "200mbit"  # about 25 MB/s: the image takes some 5 s to leave the upstream
LOST_HOLDER_BOUND = 2.1
FETCHING_EVENT = "fetching from upstream for the cluster"
SPOOLED_BEFORE_LOSS = LAYER_SIZE // 8  # what the holder has fetched when it is lost


@pytest.fixture
def holder_mesh() -> Iterator[tuple[Mesh, Upstream]]:
    with running_mesh(Mesh(3, overrides=FAST_TIMINGS)) as mesh:
        yield mesh, start_counted_upstream(mesh)


def slow_down(upstream: Upstream) -> None:
    """Shape the upstream's egress (the qdisc goes with its namespace)."""
    upstream.host.exec(
        ["tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", UPSTREAM_RATE,
         "burst", "256kb", "latency", "400ms"]
    )  # fmt: skip


def fetching_node(nodes: list[MeshNode], digest: str, timeout: float) -> MeshNode:
    """The node whose registry logs that it fetches `digest` from the upstream for the cluster."""

    def fetching() -> list[MeshNode]:
        return [
            node
            for node in nodes
            if any(
                record.get("event") == FETCHING_EVENT and record.get("digest") == digest
                for record in node.log_records("registry")
            )
        ]

    assert eventually(fetching, timeout, interval=0.05), f"no node logged {FETCHING_EVENT!r}"
    return fetching()[0]


def spooled(node: MeshNode, digest: str) -> int:
    """Bytes of `digest` in `node`'s spool (the default spool directory) so far."""
    path = Path(node.config["node"]["data_dir"]) / "spool" / spool_file_name(digest)
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def lose(node: MeshNode) -> None:
    """The node is gone: its address dropped, every process of it killed."""
    node.isolate()
    for name in SERVICES:
        node.kill_service(name)
    node.containerd.kill()


def test_a_holder_lost_mid_fetch_leaves_every_other_pull_whole(
    holder_mesh: tuple[Mesh, Upstream], tmp_path: Path
) -> None:
    mesh, upstream = holder_mesh
    image = push_new_image(upstream, tmp_path, "holder", layer_size=LAYER_SIZE)
    largest = max(image.blobs, key=lambda desc: desc.size)
    slow_down(upstream)
    before = upstream.sent.read()

    outcomes: list[PullOutcome] = []
    wave = threading.Thread(target=lambda: outcomes.extend(pull_together(mesh.nodes, image.name)))
    wave.start()
    holder = fetching_node(mesh.nodes, largest.digest, SEED_TIMEOUT)
    # Part of its download is in its spool (and so with the waiters) when it goes.
    assert eventually(
        lambda: spooled(holder, largest.digest) >= SPOOLED_BEFORE_LOSS, SEED_TIMEOUT, 0.05
    ), f"{holder.name} spooled no {SPOOLED_BEFORE_LOSS} bytes of {largest.digest}"
    lose(holder)
    wave.join()

    survivors = [n for n in mesh.nodes if n is not holder]
    failed = [o for o in outcomes if o.node != holder.name and o.error is not None]
    assert not failed, failed
    for node in survivors:
        assert_holds_verified(node, image)
    sent = upstream.sent.read() - before
    assert sent <= LOST_HOLDER_BOUND * image_bytes(image), (
        f"the upstream sent {sent / image_bytes(image):.2f}x the image"
    )
