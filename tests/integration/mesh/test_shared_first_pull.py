"""A new image pulled by several nodes at once costs the upstream one download, not one per node.

Every node of the netns mesh runs its own containerd and pulls through CRI (kubelet's path). The
upstream is Debian's docker-registry in a namespace of its own; what it sends is counted by the
kernel there (an iptables byte counter), its manifest GETs by its own log: both outside
peermirror. Pull times are the benchmark's business (bench/first_pull.py), not this test's.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.first_pull_wave import (
    Upstream,
    image_bytes,
    manifest_gets,
    pull_together,
    push_new_image,
    start_counted_upstream,
)
from tests.harness.fixtures_mesh import running_mesh
from tests.harness.mesh import Mesh
from tests.harness.mesh_p2p import (
    FAST_TIMINGS,
    assert_holds_verified,
    cri_pull,
    wait_advertised,
)

pytestmark = pytest.mark.containerd

NODES = 6  # the 5-node wave, and one node that joins after it
# Upstream bytes a wave may cost, in images: the blobs once, plus HTTP headers and the odd
# resumed range (the bound).
WAVE_BOUND = 1.05


@pytest.fixture(scope="module")
def wave_mesh() -> Iterator[tuple[Mesh, Upstream]]:
    with running_mesh(Mesh(NODES, overrides=FAST_TIMINGS)) as mesh:
        yield mesh, start_counted_upstream(mesh)


@pytest.mark.parametrize("wave", [3, 5])
def test_a_wave_of_first_pulls_downloads_the_image_once(
    wave_mesh: tuple[Mesh, Upstream], tmp_path: Path, wave: int
) -> None:
    mesh, upstream = wave_mesh
    image = push_new_image(upstream, tmp_path, f"wave{wave}")
    before = upstream.sent.read()

    outcomes = pull_together(mesh.nodes[:wave], image.name)

    failed = [o for o in outcomes if o.error is not None]
    assert not failed, failed
    for node in mesh.nodes[:wave]:
        assert_holds_verified(node, image)
    sent = upstream.sent.read() - before
    assert sent <= WAVE_BOUND * image_bytes(image), (
        f"{wave} nodes made the upstream send {sent / image_bytes(image):.2f}x the image"
    )
    repository = image.name.split("/", 1)[1].rpartition(":")[0]
    assert manifest_gets(upstream, image) == 1, [
        f"{r.get('http.request.method')} {str(r.get('http.request.uri'))[-30:]} "
        f"{r.get('http.request.remoteaddr')} {r.get('time')}"
        for r in upstream.registry.requests(path_part=f"/v2/{repository}/manifests/")
    ]

    # After the wave a node that was not part of it is served by its peers alone.
    late = mesh.nodes[-1]
    wait_advertised([late], image, mesh.nodes[:wave])
    before, asked = upstream.sent.read(), len(upstream.registry.requests())
    cri_pull(late, image.name)
    assert_holds_verified(late, image)
    assert len(upstream.registry.requests()) == asked
    assert upstream.sent.read() - before == 0
