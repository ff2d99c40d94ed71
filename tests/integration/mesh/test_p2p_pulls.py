"""Peer-to-peer pulls on three real nodes with no upstream: what one node holds, the others pull.

One 3-node netns mesh (short discovery timings) serves the whole module; each test seeds images
with names of its own, so tests only share the mesh. containerd's every non-mirror endpoint is
http://127.0.0.1:9, so a pull that succeeds was served by the mirror, i.e. by peers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.oci.media_types import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from tests.harness.fixtures_mesh import running_mesh
from tests.harness.images import BuiltImage, build_image
from tests.harness.mesh import NOWHERE, Mesh, MeshNode, pull_via_mirror
from tests.harness.mesh_p2p import (
    FAST_TIMINGS,
    LIVENESS_WINDOW,
    LOOKUP_CACHE_TTL,
    PULL_TIMEOUT,
    SCHEDULING_SLACK,
    SEED_TIMEOUT,
    advertised_keys,
    assert_holds_verified,
    cri_pull,
    drop_archive,
    finds,
    held_digests,
    image_keys,
    import_image,
    nobody_advertises,
    oci_error_codes,
    providers,
    raw_get,
    remove_image,
    served_to_peers,
    unique_ref,
    v2_url,
    wait_advertised,
    wait_imported,
)
from tests.harness.wait import eventually

pytestmark = pytest.mark.containerd

MANIFEST_ACCEPT = {"Accept": ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST])}
# A pull that cannot be served must end (fail) well within this: no hang anywhere.
FAILING_PULL_TIMEOUT = 90.0
DEAD_ENDPOINT = NOWHERE.removeprefix("http://")


@pytest.fixture(scope="module")
def p2p_mesh() -> Iterator[Mesh]:
    with running_mesh(Mesh(3, overrides=FAST_TIMINGS)) as mesh:
        yield mesh


@pytest.fixture(scope="module")
def airgap_image(p2p_mesh: Mesh, tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    """A two-layer image imported on node 1 from an air-gap archive and advertised."""
    n1, n2, n3 = p2p_mesh.nodes
    image = build_image(
        tmp_path_factory.mktemp("airgap"), name=unique_ref("airgap"), layers=2, layer_size=300_000
    )
    drop_archive(n1, image)
    wait_imported(n1, image)
    wait_advertised([n2, n3], image, [n1])
    return image


def digest_ref(image: BuiltImage) -> str:
    return f"{image.name.rsplit(':', 1)[0]}@{image.target.digest}"


def pull_and_count(node: MeshNode, ref: str, sources: list[MeshNode]) -> dict[str, int]:
    """Pull `ref` on `node` through its mirror; returns how many more peer requests `sources`
    served meanwhile, by kind."""
    before = [served_to_peers(s) for s in sources]
    pull_via_mirror(node, ref, timeout=PULL_TIMEOUT)
    after = [served_to_peers(s) for s in sources]
    return {k: sum(a[k] - b[k] for a, b in zip(after, before, strict=True)) for k in before[0]}


def test_airgap_image_on_node1_pulls_on_node3_by_tag_and_by_digest(
    p2p_mesh: Mesh, airgap_image: BuiltImage
) -> None:
    n1, _, n3 = p2p_mesh.nodes
    image = airgap_image
    assert not held_digests(n3) & {d.digest for d in image.blobs}

    served = pull_and_count(n3, image.name, [n1])
    assert_holds_verified(n3, image)
    # Node 1's registry answered node 3's mirror: the manifest and every other blob.
    assert served["manifest"] >= 1
    assert served["blob"] >= len(image.blobs) - 1

    remove_image(n3, image)
    assert not held_digests(n3) & {d.digest for d in image.blobs}
    ref = digest_ref(image)
    served = pull_and_count(n3, ref, [n1])
    assert_holds_verified(n3, image, ref)
    assert served["manifest"] >= 1
    assert served["blob"] >= len(image.blobs) - 1


def test_multi_arch_index_pulls_every_platform_from_a_peer(p2p_mesh: Mesh, tmp_path: Path) -> None:
    n1, _, n3 = p2p_mesh.nodes
    image = build_image(
        tmp_path / "img",
        name=unique_ref("multiarch"),
        layers=2,
        layer_size=200_000,
        platforms=["linux/amd64", "linux/arm64/v8", "linux/s390x"],
        media="docker",
    )
    drop_archive(n1, image)
    wait_imported(n1, image)
    wait_advertised([n3], image, [n1])

    served = pull_and_count(n3, image.name, [n1])
    assert_holds_verified(n3, image)
    # The manifest list and the three platform manifests.
    assert served["manifest"] >= 4
    assert served["blob"] >= 3 * 3


def test_cri_pull_image_on_node2_is_served_by_peers(
    p2p_mesh: Mesh, airgap_image: BuiltImage
) -> None:
    n1, n2, n3 = p2p_mesh.nodes
    image = airgap_image
    before = [served_to_peers(n) for n in (n1, n3)]
    image_id = cri_pull(n2, image.name)
    assert image_id == image.platforms[0].config.digest
    assert_holds_verified(n2, image)
    after = [served_to_peers(n) for n in (n1, n3)]
    assert sum(a["blob"] - b["blob"] for a, b in zip(after, before, strict=True)) >= 3


def test_deleted_image_is_no_longer_advertised_and_the_pull_falls_through(
    p2p_mesh: Mesh, tmp_path: Path
) -> None:
    n1, n2, n3 = p2p_mesh.nodes
    image = build_image(tmp_path / "img", name=unique_ref("deleted"), layers=1)
    import_image(n1, image, tmp_path)
    wait_advertised([n2, n3], image, [n1])
    tag = image.name.rsplit(":", 1)[1]
    served = raw_get(v2_url(n3, image, "manifests", tag), MANIFEST_ACCEPT)
    assert served.status == 200 and served.digest == image.target.digest

    remove_image(n1, image)
    assert not held_digests(n1) & {d.digest for d in image.blobs}
    # Withdrawals are sent at once; the liveness window bounds how long a stale record can
    # last (plus the lookup cache and scheduling on a busy machine).
    gone = eventually(
        lambda: nobody_advertises([n2, n3], image_keys(image)),
        LIVENESS_WINDOW + LOOKUP_CACHE_TTL + SCHEDULING_SLACK,
    )
    assert gone, {k: providers(n3, k) for k in image_keys(image)}

    manifest = raw_get(v2_url(n3, image, "manifests", tag), MANIFEST_ACCEPT, timeout=5.0)
    assert manifest.status == 404
    assert oci_error_codes(manifest.body) == ["MANIFEST_UNKNOWN"]
    layer = image.platforms[0].layers[0].descriptor.digest
    blob = raw_get(v2_url(n3, image, "blobs", layer), timeout=5.0)
    assert blob.status == 404
    assert oci_error_codes(blob.body) == ["BLOB_UNKNOWN"]

    result = pull_via_mirror(n3, image.name, check=False, timeout=FAILING_PULL_TIMEOUT)
    assert result.returncode != 0
    # containerd went past its mirror to the default endpoint, where nothing answers.
    assert DEAD_ENDPOINT in result.stderr, result.stderr
    assert not held_digests(n3) & {d.digest for d in image.blobs}


def test_unlisted_registry_and_latest_tag_are_not_served(p2p_mesh: Mesh, tmp_path: Path) -> None:
    n1, n2, n3 = p2p_mesh.nodes
    unlisted = build_image(tmp_path / "q", name=unique_ref("unlisted", registry="quay.io"))
    latest_name = unique_ref("latest").rsplit(":", 1)[0] + ":latest"
    latest = build_image(tmp_path / "l", name=latest_name)
    import_image(n1, unlisted, tmp_path)
    import_image(n1, latest, tmp_path)
    # Digests of a :latest image of a mirrored registry are advertised (only the tag is not):
    # once they are, the pinner has handled both imports.
    for d in latest.blobs:
        assert eventually(finds(n3, d.digest, {n1.ip}), SEED_TIMEOUT), d

    # Not mirrored: nothing advertised, and no node serves it, not even the one holding it.
    assert nobody_advertises([n2, n3], image_keys(unlisted))
    for node in (n1, n3):
        for reference in ("1", unlisted.target.digest):
            answer = raw_get(v2_url(node, unlisted, "manifests", reference), MANIFEST_ACCEPT)
            assert answer.status == 404, (node.name, reference)
        layer = unlisted.platforms[0].layers[0].descriptor.digest
        assert raw_get(v2_url(node, unlisted, "blobs", layer)).status == 404

    # :latest is mutable: never resolved, locally or through peers; digests still are.
    assert providers(n3, latest.name) == set()
    for node in (n1, n3):
        answer = raw_get(v2_url(node, latest, "manifests", "latest"), MANIFEST_ACCEPT)
        assert answer.status == 404, node.name
    by_digest = raw_get(v2_url(n3, latest, "manifests", latest.target.digest), MANIFEST_ACCEPT)
    assert by_digest.status == 200 and by_digest.digest == latest.target.digest
    result = pull_via_mirror(n3, latest.name, check=False, timeout=FAILING_PULL_TIMEOUT)
    assert result.returncode != 0
    assert DEAD_ENDPOINT in result.stderr, result.stderr


@pytest.mark.slow
def test_one_gib_single_layer_image_pulls_from_a_peer(p2p_mesh: Mesh, tmp_path: Path) -> None:
    n1, _, n3 = p2p_mesh.nodes
    image = build_image(
        tmp_path / "big",
        name=unique_ref("gib"),
        layers=1,
        layer_size=1 << 30,
        cheap_data=True,
        compresslevel=0,
    )
    layer = image.platforms[0].layers[0].descriptor
    assert layer.size >= 1 << 30
    drop_archive(n1, image)
    wait_imported(n1, image)
    wait_advertised([n3], image, [n1])
    served = pull_and_count(n3, image.name, [n1])
    assert_holds_verified(n3, image)
    assert served["blob"] >= 2


# Last in the module: node 1's discovery restart may leave the mesh split (see the report).
def test_restarts_of_registry_and_discovery_are_independent(p2p_mesh: Mesh, tmp_path: Path) -> None:
    n1, n2, n3 = p2p_mesh.nodes
    first = build_image(tmp_path / "a", name=unique_ref("restart-a"), layers=1)
    import_image(n1, first, tmp_path)
    wait_advertised([n3], first, [n1])

    # Without its mirror, containerd falls back at once to the (dead) default endpoint.
    n3.stop_service("registry")
    try:
        result = pull_via_mirror(n3, first.name, check=False, timeout=FAILING_PULL_TIMEOUT)
        assert result.returncode != 0
        assert DEAD_ENDPOINT in result.stderr, result.stderr
        assert not held_digests(n3) & {d.digest for d in first.blobs}
    finally:
        n3.start_service("registry")
    pull_via_mirror(n3, first.name, timeout=PULL_TIMEOUT)
    assert_holds_verified(n3, first)

    # Node 1's discovery restarts empty. Content node 1 took in while it was down can only be
    # found if the pinner re-announces node 1's whole set to the new process.
    second = build_image(tmp_path / "b", name=unique_ref("restart-b"), layers=1)
    import_image(n1, second, tmp_path)
    wait_advertised([n3], second, [n1])
    n1.stop_service("discovery")
    third = build_image(tmp_path / "c", name=unique_ref("restart-c"), layers=1)
    try:
        import_image(n1, third, tmp_path)
    finally:
        n1.start_service("discovery")
    wanted = set(image_keys(second)) | set(image_keys(third))
    assert eventually(lambda: wanted <= advertised_keys(n1), SEED_TIMEOUT)
    wait_advertised([n2, n3], third, [n1])
    pull_via_mirror(n3, third.name, timeout=PULL_TIMEOUT)
    assert_holds_verified(n3, third)
