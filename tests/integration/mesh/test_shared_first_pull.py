"""A new image pulled by several nodes at once costs the upstream one download, not one per node.

Every node of the netns mesh runs its own containerd and pulls through CRI (kubelet's path). The
upstream is Debian's docker-registry in a namespace of its own; what it sends is counted by the
kernel there (an iptables byte counter), its manifest GETs by its own log: both outside
peermirror. Pull times are the benchmark's business (bench/first_pull.py), not this test's.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.fixtures_mesh import running_mesh
from tests.harness.images import BuiltImage, build_image, write_oci_archive
from tests.harness.mesh import Mesh, NetnsHost
from tests.integration.mesh.first_pull import (
    count_upstream_bytes,
    manifest_gets,
    pull_together,
    sent_bytes,
)
from tests.integration.mesh.p2p import (
    FAST_TIMINGS,
    PULL_TIMEOUT,
    assert_holds_verified,
    cri_pull,
    unique_ref,
    wait_advertised,
)
from tests.integration.mesh.test_p2p_upstream import (
    MIRRORED,
    UPSTREAM_PORT,
    point_mirrors_at,
    start_upstream,
)

pytestmark = pytest.mark.containerd

NODES = 6  # the 5-node wave, and one node that joins after it
LAYERS = 4
LAYER_SIZE = 128 * 1024 * 1024  # a 512 MiB image
# Upstream bytes a wave may cost, in images: the blobs once, plus HTTP headers and the odd
# resumed range (the bound).
WAVE_BOUND = 1.05


@dataclass
class Upstream:
    host: NetnsHost

    @property
    def log(self) -> Path:
        return self.host.dir / "logs" / "docker-registry.log"


@pytest.fixture(scope="module")
def wave_mesh() -> Iterator[tuple[Mesh, Upstream]]:
    with running_mesh(Mesh(NODES, overrides=FAST_TIMINGS)) as mesh:
        host = start_upstream(mesh)
        count_upstream_bytes(host, UPSTREAM_PORT)
        point_mirrors_at(mesh, host)
        yield mesh, Upstream(host)


def push_new_image(
    upstream: Upstream, scratch: Path, stem: str, layer_size: int = LAYER_SIZE
) -> BuiltImage:
    """A 4-layer image no node has seen, pushed into the upstream with skopeo."""
    image = build_image(
        scratch / "img",
        name=unique_ref(stem, registry=MIRRORED),
        layers=LAYERS,
        layer_size=layer_size,
        cheap_data=True,
        compresslevel=0,
    )
    archive = scratch / "image.tar"
    write_oci_archive(archive, [image])
    repository = image.name.split("/", 1)[1]
    upstream.host.exec(
        [
            "skopeo",
            "copy",
            "--dest-tls-verify=false",
            f"oci-archive:{archive}",
            f"docker://{upstream.host.ip}:{UPSTREAM_PORT}/{repository}",
        ],
        timeout=PULL_TIMEOUT,
    )
    archive.unlink()
    return image


def image_bytes(image: BuiltImage) -> int:
    return sum(desc.size for desc in image.blobs)


@pytest.mark.parametrize("wave", [3, 5])
def test_a_wave_of_first_pulls_downloads_the_image_once(
    wave_mesh: tuple[Mesh, Upstream], tmp_path: Path, wave: int
) -> None:
    mesh, upstream = wave_mesh
    image = push_new_image(upstream, tmp_path, f"wave{wave}")
    before = sent_bytes(upstream.host)

    outcomes = pull_together(mesh.nodes[:wave], image.name)

    failed = [o for o in outcomes if o.error is not None]
    assert not failed, failed
    for node in mesh.nodes[:wave]:
        assert_holds_verified(node, image)
    sent = sent_bytes(upstream.host) - before
    assert sent <= WAVE_BOUND * image_bytes(image), (
        f"{wave} nodes made the upstream send {sent / image_bytes(image):.2f}x the image"
    )
    repository, _, tag = image.name.split("/", 1)[1].rpartition(":")
    gets = manifest_gets(upstream.log, repository)
    assert gets.get(tag, 0) + gets.get(image.target.digest, 0) == 1, gets

    # After the wave a node that was not part of it is served by its peers alone.
    late = mesh.nodes[-1]
    wait_advertised([late], image, mesh.nodes[:wave])
    before = sent_bytes(upstream.host)
    cri_pull(late, image.name)
    assert_holds_verified(late, image)
    assert sent_bytes(upstream.host) - before == 0
