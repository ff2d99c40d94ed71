"""Archive metadata parsing, docker-save manifest synthesis and content labels."""

from __future__ import annotations

import json

import pytest

from services.common.oci.document import Children
from services.common.oci.media_types import (
    DOCKER_CONFIG,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
)
from services.common.oci.media_types import DOCKER_LAYER_TAR as DOCKER_LAYER
from services.common.oci.media_types import DOCKER_LAYER_TAR_GZIP as DOCKER_LAYER_GZIP
from services.common.store.protocol import Descriptor
from services.pinner.airgap.layout import (
    LayoutError,
    blob_digest,
    docker_layer_media_type,
    docker_manifest_bytes,
    gc_labels,
    is_metadata,
    media_type_of,
    merge_source,
    parse_children,
    parse_docker_manifest,
    parse_image_name,
    parse_oci_index,
    record_names,
)

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64


def test_blob_digest_and_metadata() -> None:
    assert blob_digest("blobs/sha256/" + "a" * 64) == "sha256:" + "a" * 64
    assert blob_digest("blobs/sha256/short") is None
    assert blob_digest("x/blobs/sha256/" + "a" * 64) is None
    assert is_metadata("index.json") and is_metadata("manifest.json")
    assert not is_metadata("abc.json")


@pytest.mark.parametrize(
    ("text", "tagged"),
    [
        ("alpine", "docker.io/library/alpine:latest"),
        ("alpine:3.19", "docker.io/library/alpine:3.19"),
        ("index.docker.io/foo/bar:1", "docker.io/foo/bar:1"),
        ("reg.example:5000/a/b:t", "reg.example:5000/a/b:t"),
    ],
)
def test_parse_image_name(text: str, tagged: str) -> None:
    assert parse_image_name(text).tagged == tagged


def test_parse_image_name_rejects_garbage() -> None:
    with pytest.raises(LayoutError):
        parse_image_name("UPPER CASE")


def test_record_names() -> None:
    assert record_names(parse_image_name("a:1"), D1) == [
        "docker.io/library/a:1",
        f"docker.io/library/a@{D1}",
    ]


def _index(entries: list[dict[str, object]]) -> bytes:
    return json.dumps({"schemaVersion": 2, "manifests": entries}).encode()


def test_parse_oci_index_names() -> None:
    data = _index(
        [
            {
                "mediaType": OCI_INDEX,
                "digest": D1,
                "size": 10,
                "annotations": {"io.containerd.image.name": "reg.test/a:1"},
            },
            {
                "mediaType": OCI_MANIFEST,
                "digest": D2,
                "size": 11,
                "annotations": {"org.opencontainers.image.ref.name": "reg.test/b:2"},
            },
            # A bare tag names nothing without a base name.
            {
                "mediaType": OCI_MANIFEST,
                "digest": D3,
                "size": 12,
                "annotations": {"org.opencontainers.image.ref.name": "latest"},
            },
        ]
    )
    named, unnamed = parse_oci_index(data)
    assert [(n.name.tagged, n.target.digest) for n in named] == [
        ("reg.test/a:1", D1),
        ("reg.test/b:2", D2),
    ]
    assert [d.digest for d in unnamed] == [D3]


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"[]",
        _index([{"digest": "md5:abc", "size": 1}]),
        _index([{"digest": D1, "size": -1}]),
    ],
)
def test_parse_oci_index_rejects_malformed(data: bytes) -> None:
    with pytest.raises(LayoutError):
        parse_oci_index(data)


def test_children_and_gc_labels() -> None:
    manifest = json.dumps(
        {
            "config": {"mediaType": "c", "digest": D1, "size": 1},
            "layers": [
                {"mediaType": "l", "digest": D2, "size": 2},
                {"mediaType": "l", "digest": D3, "size": 3},
            ],
        }
    ).encode()
    children = parse_children(media_type_of("", manifest), manifest)
    assert gc_labels(children) == {
        "containerd.io/gc.ref.content.config": D1,
        "containerd.io/gc.ref.content.l.0": D2,
        "containerd.io/gc.ref.content.l.1": D3,
    }
    index = _index([{"mediaType": OCI_MANIFEST, "digest": D1, "size": 1}])
    assert media_type_of("", index) == OCI_INDEX
    assert gc_labels(parse_children(OCI_INDEX, index)) == {"containerd.io/gc.ref.content.m.0": D1}
    assert gc_labels(Children()) == {}
    with pytest.raises(LayoutError):
        parse_children("application/octet-stream", manifest)


def test_merge_source_keeps_every_repository_once() -> None:
    assert merge_source(None, ["b", "a"]) == "a,b"
    assert merge_source("a,c", ["b", "a"]) == "a,b,c"
    long_names = [f"repo{i:04d}/" + "x" * 50 for i in range(200)]
    assert len(merge_source(None, long_names)) <= 4096


def test_docker_manifest_parsing_and_synthesis() -> None:
    data = json.dumps(
        [
            {
                "Config": "abc.json",
                "RepoTags": ["alpine:3", "reg.test/x/y:1"],
                "Layers": ["./l1/layer.tar", "l2/layer.tar"],
            },
            {"Config": "def.json", "RepoTags": None, "Layers": []},
        ]
    ).encode()
    first, second = parse_docker_manifest(data)
    assert first.config == "abc.json"
    assert first.layers == ("l1/layer.tar", "l2/layer.tar")
    assert [n.tagged for n in first.repo_tags] == ["docker.io/library/alpine:3", "reg.test/x/y:1"]
    assert second.repo_tags == ()
    with pytest.raises(LayoutError):
        parse_docker_manifest(b'[{"Config": 1}]')

    manifest = json.loads(
        docker_manifest_bytes(Descriptor(D1, 5, DOCKER_CONFIG), [Descriptor(D2, 7, DOCKER_LAYER)])
    )
    assert manifest["mediaType"] == DOCKER_MANIFEST
    assert manifest["config"] == {"mediaType": DOCKER_CONFIG, "size": 5, "digest": D1}
    assert manifest["layers"] == [{"mediaType": DOCKER_LAYER, "size": 7, "digest": D2}]


def test_docker_layer_media_type_sniffs_compression() -> None:
    assert docker_layer_media_type(b"\x1f\x8b\x08") == DOCKER_LAYER_GZIP
    assert docker_layer_media_type(b"ustar") == DOCKER_LAYER
