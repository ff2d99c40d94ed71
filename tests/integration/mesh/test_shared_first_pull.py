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
from tests.harness.images import BuiltImage, build_image
from tests.harness.mesh import Mesh, NetnsHost
from tests.harness.upstream import DistributionRegistry, SentBytes, push_image, start_in_netns
from tests.integration.mesh.first_pull import pull_together
from tests.integration.mesh.p2p import (
    FAST_TIMINGS,
    assert_holds_verified,
    cri_pull,
    unique_ref,
    wait_advertised,
)
from tests.integration.mesh.test_p2p_upstream import MIRRORED, UPSTREAM_PORT, point_mirrors_at

pytestmark = pytest.mark.containerd

NODES = 6  # the 5-node wave, and one node that joins after it
LAYERS = 4
LAYER_SIZE = 128 * 1024 * 1024  # a 512 MiB image
# Upstream bytes a wave may cost, in images: the blobs once, plus HTTP headers and the odd
# resumed range (the bound).
WAVE_BOUND = 1.05


@dataclass
class Upstream:
    """The upstream registry, its namespace and the kernel's count of what it sent."""

    host: NetnsHost
    registry: DistributionRegistry
    sent: SentBytes


def start_counted_upstream(mesh: Mesh) -> Upstream:
    """docker-registry in a namespace of its own, its sent bytes counted, every node's
    registries.yaml pointing `registry.test:5000` at it."""
    host = mesh.add_host("upstream")
    registry = start_in_netns(host, port=UPSTREAM_PORT)
    sent = SentBytes(host, UPSTREAM_PORT).install()
    point_mirrors_at(mesh, host)
    return Upstream(host, registry, sent)


@pytest.fixture(scope="module")
def wave_mesh() -> Iterator[tuple[Mesh, Upstream]]:
    with running_mesh(Mesh(NODES, overrides=FAST_TIMINGS)) as mesh:
        yield mesh, start_counted_upstream(mesh)


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
    push_image(image, upstream.registry, via=upstream.host)
    return image


def image_bytes(image: BuiltImage) -> int:
    return sum(desc.size for desc in image.blobs)


def manifest_gets(upstream: Upstream, image: BuiltImage) -> int:
    """GETs the upstream answered for `image`'s manifest, by tag or by digest."""
    repository, _, tag = image.name.split("/", 1)[1].rpartition(":")
    prefix = f"/v2/{repository}/manifests/"
    refs = {f"{prefix}{tag}", f"{prefix}{image.target.digest}"}
    return sum(
        1
        for r in upstream.registry.requests("GET", prefix)
        if str(r["http.request.uri"]).split("?", 1)[0] in refs
    )


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
