"""Peers that fail a pull: one dies mid-blob, one serves altered bytes; the pull still succeeds.

Nodes 1 and 2 hold the same image, node 3 pulls it through its mirror; each test has a mesh of
its own. Which holder node 3's mirror picks first is
its own choice (least used, fastest), so the failover test kills whichever one is sending.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.fixtures_mesh import running_mesh
from tests.harness.images import build_image
from tests.harness.mesh import K8S_NAMESPACE, SERVICES, Mesh, MeshNode
from tests.harness.mesh_p2p import (
    FAST_TIMINGS,
    PULL_TIMEOUT,
    assert_holds_verified,
    cri_pull,
    import_image,
    log_events,
    raw_get,
    registry_stats,
    served_to_peers,
    unique_ref,
    v2_url,
    wait_advertised,
)
from tests.harness.wait import eventually

pytestmark = pytest.mark.containerd

MIB = 1 << 20
# Holders send at most this fast, so a 512 MiB blob takes seconds and has a middle to die in.
SHAPED_RATE = "400mbit"
# Bytes node 3 must have received from the serving peer before that peer dies.
KILL_AFTER = 64 * MIB
SHAPE = ["tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", SHAPED_RATE]
SHAPE += ["burst", "256kb", "latency", "100ms"]
QUARANTINE_EVENT = "peer quarantined: it sent content not matching its digest"


# One mesh per test: a node whose discovery restarts after its peers dropped it stays apart
# (see the restart test), so a killed node is not brought back for the next test.
@pytest.fixture
def fo_mesh() -> Iterator[Mesh]:
    with running_mesh(Mesh(3, overrides=FAST_TIMINGS)) as mesh:
        yield mesh


def largest_ingest(node: MeshNode) -> int:
    """Bytes of the largest download containerd on `node` has in progress."""
    sizes = [p.stat().st_size for p in (node.containerd.content_root / "ingest").glob("*/data")]
    return max(sizes, default=0)


def serving_peer(candidates: list[MeshNode]) -> MeshNode | None:
    """The one candidate whose registry is answering a request right now (None unless exactly
    one is)."""
    busy = [n for n in candidates if registry_stats(n).in_flight > 0]
    return busy[0] if len(busy) == 1 else None


def test_pull_completes_from_the_other_peer_when_the_serving_one_dies_mid_blob(
    fo_mesh: Mesh, tmp_path: Path
) -> None:
    n1, n2, n3 = fo_mesh.nodes
    image = build_image(
        tmp_path / "big",
        name=unique_ref("failover"),
        layers=1,
        layer_size=512 * MIB,
        cheap_data=True,
        compresslevel=0,
    )
    layer = image.platforms[0].layers[0].descriptor
    import_image([n1, n2], image, tmp_path)
    wait_advertised([n3], image, [n1, n2])
    holders = [n1, n2]
    for node in holders:
        node.exec(SHAPE)
    argv = n3.containerd.ctr_argv(
        ["images", "pull", "--hosts-dir", str(n3.hosts_dir), image.name], K8S_NAMESPACE
    )
    pull = n3.popen("failover-pull", ["timeout", str(int(PULL_TIMEOUT)), *argv])
    in_middle = eventually(
        lambda: largest_ingest(n3) >= KILL_AFTER or not pull.running, PULL_TIMEOUT, 0.05
    )
    assert in_middle and pull.running, pull.log_tail()
    # Only the big layer is still on its way: exactly one holder is sending it.
    victim = serving_peer(holders)
    assert victim is not None, [registry_stats(n).in_flight for n in holders]
    victim.isolate()
    for service in SERVICES:
        victim.stop_service(service)
    assert largest_ingest(n3) < layer.size
    assert eventually(lambda: not pull.running, PULL_TIMEOUT), pull.log_tail()
    assert pull.returncode == 0, pull.log_tail()
    assert_holds_verified(n3, image)
    survivor = n2 if victim is n1 else n1
    resumed = log_events(n3, "registry", "blob relay resumed")
    assert any(
        r.get("digest") == layer.digest
        and r.get("peer") == f"{survivor.ip}:{survivor.registry_port}"
        for r in resumed
    ), resumed


def test_altered_blob_is_never_delivered_whole_and_its_peer_is_quarantined(
    fo_mesh: Mesh, tmp_path: Path
) -> None:
    n1, n2, n3 = fo_mesh.nodes
    image = build_image(
        tmp_path / "img", name=unique_ref("altered"), layers=1, layer_size=8 * MIB, cheap_data=True
    )
    import_image([n1, n2], image, tmp_path)
    wait_advertised([n3], image, [n1, n2])
    layer = image.platforms[0].layers[0].descriptor
    blob_file = n1.containerd.blob_path(layer.digest)
    with blob_file.open("r+b") as f:
        f.seek(layer.size // 2)
        original = f.read(4096)
        f.seek(layer.size // 2)
        f.write(bytes(b ^ 0xFF for b in original))
    assert blob_file.stat().st_size == layer.size
    url = v2_url(n3, image, "blobs", layer.digest)

    # With node 2's registry down, node 1's altered bytes are all node 3 can relay.
    n2.stop_service("registry")
    try:
        answer = raw_get(url)
    finally:
        n2.start_service("registry")
    assert answer.status == 200
    assert not answer.complete, "a body not matching its digest was delivered whole"
    assert len(answer.body) < layer.size
    quarantined = log_events(n3, "registry", QUARANTINE_EVENT)
    assert any(r.get("peer") == f"{n1.ip}:{n1.registry_port}" for r in quarantined), quarantined

    # Retries go to the good peer only.
    served_before = served_to_peers(n1)
    for _ in range(3):
        retry = raw_get(url)
        assert retry.status == 200 and retry.complete
        assert retry.digest == layer.digest
    pull = n3.exec(
        n3.containerd.ctr_argv(
            ["images", "pull", "--hosts-dir", str(n3.hosts_dir), image.name], K8S_NAMESPACE
        ),
        timeout=PULL_TIMEOUT,
    )
    assert pull.returncode == 0
    assert_holds_verified(n3, image)
    assert served_to_peers(n1) == served_before


def test_a_fresh_node_does_not_keep_a_congested_peer_for_a_whole_layer(
    fo_mesh: Mesh, tmp_path: Path
) -> None:
    # The case: a CRI pull of a one-layer image held by two nodes, one behind a ~1 MB/s
    # link, on a node whose relays know no rate yet (a restarted registry). Whichever holder
    # discovery names first, the congested one serves at most a small part of the layer: the
    # relay measures the other on a small Range and leaves the slow one by Range.
    n1, n2, n3 = fo_mesh.nodes
    for slow in (n1, n2):
        image = build_image(
            tmp_path / slow.name, name=unique_ref("congested"), layers=1, layer_size=24 * MIB
        )
        import_image([n1, n2], image, tmp_path)
        wait_advertised([n3], image, [n1, n2])
        n3.stop_service("registry")
        n3.start_service("registry")
        layer = image.platforms[0].layers[0].descriptor
        before = registry_stats(slow).bytes_served_local
        slow.limit_egress(8)
        try:
            cri_pull(n3, image.name)
        finally:
            slow.unlimit_egress()
        assert_holds_verified(n3, image)
        served = registry_stats(slow).bytes_served_local - before
        assert served < layer.size // 4, (slow.name, served)
