"""An image no node holds comes from the upstream registry once, then only from peers.

A Go `docker-registry` (Debian) runs in a namespace of its own on the mesh bridge and is the
`registry.test:5000` endpoint of every node's registries.yaml. Node 1 pulls through its mirror,
which has nothing, so containerd falls back to the upstream; the pinner then advertises what
node 1 now holds, and node 2 pulls the image from node 1 with the upstream unreachable.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.harness.fixtures_mesh import running_mesh
from tests.harness.images import build_image, write_oci_archive
from tests.harness.mesh import NOWHERE, Mesh, NetnsHost, pull_via_mirror, registries_data
from tests.harness.upstream import start_in_netns
from tests.integration.mesh.p2p import (
    FAST_TIMINGS,
    PULL_TIMEOUT,
    assert_holds_verified,
    served_to_peers,
    unique_ref,
    wait_advertised,
)

pytestmark = pytest.mark.containerd

UPSTREAM_PORT = 5000
MIRRORED = "registry.test:5000"


@pytest.fixture(scope="module")
def up_mesh() -> Iterator[Mesh]:
    with running_mesh(Mesh(3, overrides=FAST_TIMINGS)) as mesh:
        yield mesh


def start_upstream(mesh: Mesh) -> NetnsHost:
    """docker-registry on <upstream ip>:5000 inside its own namespace, logging every request."""
    host = mesh.add_host("upstream")
    start_in_netns(host, port=UPSTREAM_PORT)
    return host


def point_mirrors_at(mesh: Mesh, upstream: NetnsHost) -> None:
    """Every node's registries.yaml names the upstream as `registry.test:5000`'s endpoint; the
    pinners are restarted to write hosts.toml from it."""
    endpoint = f"http://{upstream.ip}:{UPSTREAM_PORT}"
    mirrors = {"docker.io": [NOWHERE], MIRRORED: [endpoint]}
    for node in mesh.nodes:
        path = Path(node.config["registry"]["registries_file"])
        path.write_text(yaml.safe_dump(registries_data(mirrors), sort_keys=False))
        node.stop_service("pinner")
        node.start_service("pinner")
        hosts = tomllib.loads((node.hosts_dir / MIRRORED / "hosts.toml").read_text())
        # containerd may dial its own mirror and the upstream namespace, nothing else.
        assert hosts["server"] == f"{endpoint}/v2"
        assert set(hosts["host"]) == {f"http://127.0.0.1:{node.registry_port}/v2"}


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
