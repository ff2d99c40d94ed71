"""An image no node holds comes from the upstream registry once, then only from peers.

A Go `docker-registry` (Debian) runs in a namespace of its own on the mesh bridge and is the
`registry.test:5000` endpoint of every node's registries.yaml. Node 1 pulls through its mirror,
which has nothing, so containerd falls back to the upstream; the pinner then advertises what
node 1 now holds, and node 2 pulls the image from node 1 with the upstream unreachable.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.first_pull_wave import MIRRORED, UPSTREAM_PORT, point_mirrors_at
from tests.harness.fixtures_mesh import running_mesh
from tests.harness.images import build_image, write_oci_archive
from tests.harness.mesh import Mesh, NetnsHost, pull_via_mirror
from tests.harness.mesh_p2p import (
    FAST_TIMINGS,
    PULL_TIMEOUT,
    assert_holds_verified,
    served_to_peers,
    unique_ref,
    wait_advertised,
)
from tests.harness.upstream import start_in_netns

pytestmark = pytest.mark.containerd


@pytest.fixture(scope="module")
def up_mesh() -> Iterator[Mesh]:
    with running_mesh(Mesh(3, overrides=FAST_TIMINGS)) as mesh:
        yield mesh


def start_upstream(mesh: Mesh) -> NetnsHost:
    """docker-registry on <upstream ip>:5000 inside its own namespace, logging every request."""
    host = mesh.add_host("upstream")
    start_in_netns(host, port=UPSTREAM_PORT)
    return host


def test_image_from_upstream_is_then_served_to_the_next_node_by_peers(
    up_mesh: Mesh, tmp_path: Path
) -> None:
    n1, n2, _ = up_mesh.nodes
    upstream = start_upstream(up_mesh)
    point_mirrors_at(up_mesh, upstream)
    image = build_image(tmp_path / "img", name=unique_ref("upstream", registry=MIRRORED))
    archive = tmp_path / "image.tar"
    write_oci_archive(archive, [image])
    repository = image.name.split("/", 1)[1]
    upstream.exec(
        [
            "skopeo",
            "copy",
            "--dest-tls-verify=false",
            f"oci-archive:{archive}",
            f"docker://{upstream.ip}:{UPSTREAM_PORT}/{repository}",
        ],
        timeout=PULL_TIMEOUT,
    )

    # Nobody holds it: node 1's mirror misses, containerd falls back to the upstream.
    pull_via_mirror(n1, image.name, timeout=PULL_TIMEOUT)
    assert_holds_verified(n1, image)
    upstream_log = (upstream.dir / "logs" / "docker-registry.log").read_text()
    assert image.target.digest in upstream_log or repository.rsplit(":", 1)[0] in upstream_log

    wait_advertised([n2], image, [n1])
    upstream.isolate()
    before = served_to_peers(n1)
    pull_via_mirror(n2, image.name, timeout=PULL_TIMEOUT)
    assert_holds_verified(n2, image)
    after = served_to_peers(n1)
    assert after["manifest"] > before["manifest"]
    assert after["blob"] >= before["blob"] + len(image.blobs) - 1
