"""The one OCI document module: digests, descriptors, children, index.json names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.common.oci.document import (
    ANNOTATION_CONTAINERD_NAME,
    ANNOTATION_REF_NAME,
    DocumentError,
    blob_path,
    descriptor,
    digest_matches,
    digest_of,
    manifest_children,
    parse_children,
    reachable,
    split_digest,
    strict_descriptor,
)
from services.common.oci.media_types import OCI_CONFIG, OCI_INDEX, OCI_MANIFEST
from services.common.store.oci_layout import named_images
from services.common.store.protocol import Descriptor
from services.pinner.airgap.layout import parse_oci_index

SHA256 = digest_of(b"x")
SHA512 = digest_of(b"x", "sha512")


@pytest.mark.parametrize(
    ("digest", "parts"),
    [
        (SHA256, ("sha256", SHA256[7:])),
        (SHA512, ("sha512", SHA512[7:])),
        ("sha256:" + "A" * 64, None),
        ("sha256:" + "a" * 63, None),
        ("md5:" + "a" * 32, None),
        ("sha256:../../etc/passwd", None),
        ("sha256", None),
    ],
)
def test_split_digest_takes_only_supported_well_formed_digests(
    digest: str, parts: tuple[str, str] | None
) -> None:
    assert split_digest(digest) == parts
    assert (blob_path(Path("/root"), digest) is None) == (parts is None)


def test_digest_matches() -> None:
    assert digest_matches(SHA256, b"x") and digest_matches(SHA512, b"x")
    assert not digest_matches(SHA256, b"y")
    assert not digest_matches("sha256:nonsense", b"x")
    # What the relay's manifest check (once its own body_matches) relies on: a sha512 digest
    # refuses a truncated body, an unsupported algorithm refuses everything.
    assert not digest_matches(SHA512, b"")
    assert not digest_matches("md5:abc", b"x")


def test_lenient_and_strict_descriptors() -> None:
    good = {"digest": SHA256, "size": 1, "mediaType": OCI_CONFIG}
    assert descriptor(good) == strict_descriptor(good, "c") == Descriptor(SHA256, 1, OCI_CONFIG)
    assert descriptor({"digest": SHA256, "size": True}) == Descriptor(SHA256, 0, "")
    for bad, says in [
        ("x", "not an object"),
        ({"digest": "sha256:1", "size": 1}, "digest"),
        ({"digest": SHA256, "size": -1}, "size"),
        ({"digest": SHA256, "size": 1, "mediaType": 3}, "mediaType"),
    ]:
        with pytest.raises(DocumentError, match=f"^layers\\[0\\]: .*{says}"):
            strict_descriptor(bad, "layers[0]")


def manifest(config: object, layers: object) -> bytes:
    return json.dumps({"mediaType": OCI_MANIFEST, "config": config, "layers": layers}).encode()


def test_children_by_role_lenient_skips_what_strict_refuses() -> None:
    layer = {"digest": SHA512, "size": 2, "mediaType": "x"}
    body = manifest({"digest": SHA256, "size": 1, "mediaType": OCI_CONFIG}, [layer, "junk"])
    children = parse_children(body, OCI_MANIFEST)
    assert children.config == Descriptor(SHA256, 1, OCI_CONFIG)
    assert children.layers == (Descriptor(SHA512, 2, "x"),)
    assert manifest_children(body) == (children.config, *children.layers)
    with pytest.raises(DocumentError, match=r"layers\[1\]"):
        parse_children(body, OCI_MANIFEST, strict=True)
    with pytest.raises(DocumentError, match="unsupported manifest media type"):
        parse_children(body, OCI_CONFIG, strict=True)
    with pytest.raises(DocumentError, match="not valid JSON"):
        parse_children(b"{", OCI_INDEX, strict=True)
    assert manifest_children(b"{") == ()


ENTRIES = [
    {ANNOTATION_CONTAINERD_NAME: "docker.io/library/a:1"},
    {ANNOTATION_REF_NAME: "registry.test/team/b:2"},
    {ANNOTATION_REF_NAME: "docker.io/library/c:3"},
    # A reference without a `/`: no tag holds a `:`, so it names an image in both readers.
    {ANNOTATION_REF_NAME: "app:4"},
    {ANNOTATION_REF_NAME: "bare-tag"},
    {},
]


def test_the_layout_store_and_the_air_gap_import_name_entries_alike() -> None:
    entries: list[dict[str, object]] = [
        {
            "mediaType": OCI_MANIFEST,
            "digest": digest_of(str(i).encode()),
            "size": 1,
            "annotations": a,
        }
        for i, a in enumerate(ENTRIES)
    ]
    store_names = {d.digest: name for name, d in named_images(entries, None).items()}
    named, unnamed = parse_oci_index(json.dumps({"manifests": entries}).encode())
    assert set(store_names) == {n.target.digest for n in named}
    assert len(unnamed) == len(entries) - len(store_names)


def _chain(length: int) -> dict[str, tuple[Descriptor, ...]]:
    """Indexes nested `length` deep: index i's one child is index i+1, the last has a layer."""
    nodes = [Descriptor(digest_of(str(i).encode()), 10, OCI_INDEX) for i in range(length)]
    layer = Descriptor(digest_of(b"layer"), 10, "application/vnd.oci.image.layer.v1.tar")
    graph: dict[str, tuple[Descriptor, ...]] = {"top": (nodes[0],)}
    for i, node in enumerate(nodes):
        graph[node.digest] = (nodes[i + 1] if i + 1 < length else layer,)
    return graph


def test_a_walk_follows_every_level_unless_bounded() -> None:
    graph = _chain(12)
    top = graph["top"][0]
    everything = set(graph) | {c.digest for kids in graph.values() for c in kids}
    unbounded = reachable([top], lambda d: graph.get(d.digest), everything)
    assert len(unbounded) == 13  # 12 indexes and the layer: a prune must see them all
    bounded = reachable([top], lambda d: graph.get(d.digest), everything, max_depth=8)
    assert len(bounded) == 9


def test_an_absent_manifest_hides_its_children_and_shared_ones_count_once() -> None:
    graph = _chain(3)
    top = graph["top"][0]
    middle = graph[top.digest][0]
    everything = set(graph) | {c.digest for kids in graph.values() for c in kids}
    assert reachable([top], lambda d: graph.get(d.digest), everything - {middle.digest}) == {
        top.digest
    }
    both = reachable([top, middle], lambda d: graph.get(d.digest), everything)
    assert both == reachable([top], lambda d: graph.get(d.digest), everything)
