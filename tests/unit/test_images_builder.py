"""The synthetic image builder makes well-formed, self-consistent, reproducible images."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from services.common.store.protocol import Descriptor
from tests.harness.images import (
    ANNOTATION_CONTAINERD_NAME,
    ANNOTATION_REF_NAME,
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    BuiltImage,
    Platform,
    build_image,
    familiar_name,
    split_reference,
)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_blobs_match_digests(image: BuiltImage) -> None:
    for desc in image.blobs:
        data = image.read_blob(desc.digest)
        assert sha256(data) == desc.digest
        assert len(data) == desc.size
        assert image.blob_path(desc.digest) == (
            image.layout_dir / "blobs" / "sha256" / desc.digest.removeprefix("sha256:")
        )


def reachable(image: BuiltImage, desc: Descriptor) -> set[str]:
    """Digests reachable from `desc` by reading the image's own JSON blobs."""
    found = {desc.digest}
    if desc.media_type in (OCI_INDEX, DOCKER_MANIFEST_LIST):
        for m in json.loads(image.read_blob(desc.digest))["manifests"]:
            found |= reachable(image, Descriptor(m["digest"], m["size"], m["mediaType"]))
    elif desc.media_type in (OCI_MANIFEST, DOCKER_MANIFEST):
        doc = json.loads(image.read_blob(desc.digest))
        for d in [doc["config"], *doc["layers"]]:
            found.add(d["digest"])
    return found


def test_single_platform_oci_image_is_consistent(tmp_path: Path) -> None:
    image = build_image(tmp_path, layers=3, layer_size=10_000)
    check_blobs_match_digests(image)
    assert image.target.media_type == OCI_MANIFEST
    assert len(image.blobs) == 1 + 1 + 3
    assert len({b.digest for b in image.blobs}) == len(image.blobs)
    assert reachable(image, image.target) == {b.digest for b in image.blobs}

    manifest = json.loads(image.read_blob(image.target.digest))
    assert manifest["schemaVersion"] == 2
    assert manifest["mediaType"] == OCI_MANIFEST
    (plat,) = image.platforms
    assert manifest["config"] == {
        "mediaType": OCI_CONFIG,
        "digest": plat.config.digest,
        "size": plat.config.size,
    }
    assert [layer["mediaType"] for layer in manifest["layers"]] == [OCI_LAYER_GZIP] * 3

    config = json.loads(image.read_blob(plat.config.digest))
    assert (config["os"], config["architecture"]) == ("linux", "amd64")
    assert config["rootfs"]["type"] == "layers"
    assert config["rootfs"]["diff_ids"] == [layer.diff_id for layer in plat.layers]


def test_layers_are_gzipped_tars_holding_random_bytes(tmp_path: Path) -> None:
    image = build_image(tmp_path, layers=2, layer_size=70_001)
    contents = []
    for layer in image.platforms[0].layers:
        raw = gzip.decompress(image.read_blob(layer.descriptor.digest))
        assert sha256(raw) == layer.diff_id
        assert len(raw) == layer.uncompressed_size
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            (member,) = tar.getmembers()
            assert member.isfile()
            assert member.size == 70_001
            extracted = tar.extractfile(member)
            assert extracted is not None
            data = extracted.read()
        assert len(data) == 70_001
        # Random bytes do not compress: the blob is not much smaller than its payload.
        assert layer.descriptor.size > 70_000
        contents.append(data)
    assert contents[0] != contents[1]


def test_cheap_data_and_stored_gzip_still_give_valid_layers(tmp_path: Path) -> None:
    size = 3 * 1024 * 1024 + 5
    image = build_image(tmp_path, layers=1, layer_size=size, cheap_data=True, compresslevel=0)
    check_blobs_match_digests(image)
    (layer,) = image.platforms[0].layers
    with tarfile.open(image.blob_path(layer.descriptor.digest), "r:gz") as tar:
        (member,) = tar.getmembers()
        assert member.size == size
    assert layer.descriptor.size > size


def test_multi_arch_oci_index(tmp_path: Path) -> None:
    image = build_image(tmp_path, platforms=["linux/amd64", "linux/arm64/v8"], layers=1)
    check_blobs_match_digests(image)
    assert image.target.media_type == OCI_INDEX
    index = json.loads(image.read_blob(image.target.digest))
    assert index["mediaType"] == OCI_INDEX
    assert [m["platform"] for m in index["manifests"]] == [
        {"os": "linux", "architecture": "amd64"},
        {"os": "linux", "architecture": "arm64", "variant": "v8"},
    ]
    assert [m["digest"] for m in index["manifests"]] == [p.manifest.digest for p in image.platforms]
    for plat in image.platforms:
        config = json.loads(image.read_blob(plat.config.digest))
        assert Platform(config["os"], config["architecture"], config.get("variant", "")) == (
            plat.platform
        )
    # Each platform has its own layers.
    layer_sets = [{layer.descriptor.digest for layer in p.layers} for p in image.platforms]
    assert not layer_sets[0] & layer_sets[1]
    assert reachable(image, image.target) == {b.digest for b in image.blobs}
    assert len(image.blobs) == 1 + 2 * (1 + 1 + 1)


def test_docker_media_types(tmp_path: Path) -> None:
    single = build_image(tmp_path / "a", media="docker")
    assert single.target.media_type == DOCKER_MANIFEST
    manifest = json.loads(single.read_blob(single.target.digest))
    assert manifest["mediaType"] == DOCKER_MANIFEST
    assert manifest["config"]["mediaType"] == DOCKER_CONFIG
    assert {layer["mediaType"] for layer in manifest["layers"]} == {DOCKER_LAYER_GZIP}

    multi = build_image(tmp_path / "b", media="docker", platforms=["linux/amd64", "linux/arm64"])
    assert multi.target.media_type == DOCKER_MANIFEST_LIST
    index = json.loads(multi.read_blob(multi.target.digest))
    assert index["mediaType"] == DOCKER_MANIFEST_LIST
    assert {m["mediaType"] for m in index["manifests"]} == {DOCKER_MANIFEST}
    check_blobs_match_digests(multi)


def test_same_inputs_same_digests_other_seed_or_name_other_digests(tmp_path: Path) -> None:
    a = build_image(tmp_path / "a", seed=7)
    b = build_image(tmp_path / "b", seed=7)
    c = build_image(tmp_path / "c", seed=8)
    d = build_image(tmp_path / "d", seed=7, name="docker.io/library/other:1.0")
    assert a.target == b.target
    assert a.blobs == b.blobs
    assert c.target.digest != a.target.digest
    assert d.target.digest != a.target.digest


def test_layout_dir_names_the_image_in_index_json(tmp_path: Path) -> None:
    first = build_image(tmp_path, name="docker.io/library/one:1")
    second = build_image(tmp_path, name="127.0.0.1:5000/team/two:v2", platforms=["linux/amd64"])
    assert json.loads((tmp_path / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["schemaVersion"] == 2
    entries = {m["annotations"][ANNOTATION_CONTAINERD_NAME]: m for m in index["manifests"]}
    assert set(entries) == {first.name, second.name}
    for image in (first, second):
        entry = entries[image.name]
        assert entry["annotations"][ANNOTATION_REF_NAME] == image.name
        assert Descriptor(entry["digest"], entry["size"], entry["mediaType"]) == image.target
    # Rebuilding a name replaces its entry rather than adding a second one.
    build_image(tmp_path, name="docker.io/library/one:1", seed=1)
    index = json.loads((tmp_path / "index.json").read_text())
    assert len(index["manifests"]) == 2


def test_write_oci_layout_copies_blobs_and_merges_index(tmp_path: Path) -> None:
    a = build_image(tmp_path / "src-a", name="docker.io/library/a:1")
    b = build_image(tmp_path / "src-b", name="docker.io/library/b:1", media="docker")
    out = tmp_path / "out"
    a.write_oci_layout(out)
    b.write_oci_layout(out)
    index = json.loads((out / "index.json").read_text())
    assert {m["annotations"][ANNOTATION_REF_NAME] for m in index["manifests"]} == {a.name, b.name}
    for image in (a, b):
        for desc in image.blobs:
            copied = out / "blobs" / "sha256" / desc.digest.removeprefix("sha256:")
            assert sha256(copied.read_bytes()) == desc.digest


def test_oci_archive_is_a_tarred_layout(tmp_path: Path) -> None:
    image = build_image(tmp_path / "src", platforms=["linux/amd64", "linux/arm64"])
    archive = image.write_oci_archive(tmp_path / "img.tar")
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        assert {"oci-layout", "index.json"} <= names
        index_file = tar.extractfile("index.json")
        assert index_file is not None
        index = json.loads(index_file.read())
        blobs = {}
        for member in tar.getmembers():
            if member.isfile() and member.name.startswith("blobs/sha256/"):
                f = tar.extractfile(member)
                assert f is not None
                blobs[member.name] = f.read()
    (entry,) = index["manifests"]
    assert entry["digest"] == image.target.digest
    assert entry["annotations"] == {
        ANNOTATION_CONTAINERD_NAME: image.name,
        ANNOTATION_REF_NAME: image.name,
    }
    assert {f"sha256:{n.rsplit('/', 1)[1]}" for n in blobs} == {b.digest for b in image.blobs}
    for name, data in blobs.items():
        assert sha256(data) == "sha256:" + name.rsplit("/", 1)[1]


def test_docker_archive_has_manifest_config_and_uncompressed_layers(tmp_path: Path) -> None:
    image = build_image(tmp_path / "src", platforms=["linux/amd64", "linux/arm64"], layers=2)
    saved = image.write_docker_archive(tmp_path / "img.tar", platform="linux/arm64")
    arm = image.platforms[1]
    assert saved.repo_tag == "test:1.0"
    assert saved.config.digest == arm.config.digest
    assert [layer.digest for layer in saved.layers] == [layer.diff_id for layer in arm.layers]
    with tarfile.open(saved.path) as tar:
        manifest_file = tar.extractfile("manifest.json")
        assert manifest_file is not None
        (manifest,) = json.loads(manifest_file.read())
        assert manifest["RepoTags"] == ["test:1.0"]
        config_file = tar.extractfile(manifest["Config"])
        assert config_file is not None
        assert sha256(config_file.read()) == arm.config.digest
        for layer_name, layer in zip(manifest["Layers"], arm.layers, strict=True):
            assert layer_name.endswith("/layer.tar")
            f = tar.extractfile(layer_name)
            assert f is not None
            assert sha256(f.read()) == layer.diff_id
    with pytest.raises(ValueError, match="no platform"):
        image.write_docker_archive(tmp_path / "x.tar", platform="linux/s390x")


@pytest.mark.parametrize(
    ("name", "parts", "familiar"),
    [
        ("docker.io/library/test:1.0", ("docker.io", "library/test", "1.0"), "test:1.0"),
        ("docker.io/team/app:v1", ("docker.io", "team/app", "v1"), "team/app:v1"),
        ("127.0.0.1:5000/a/b:c", ("127.0.0.1:5000", "a/b", "c"), "127.0.0.1:5000/a/b:c"),
    ],
)
def test_reference_helpers(name: str, parts: tuple[str, str, str], familiar: str) -> None:
    assert split_reference(name) == parts
    assert familiar_name(name) == familiar


@pytest.mark.parametrize("bad", ["test:1.0", "docker.io/library/test", "x/y@sha256:00"])
def test_builder_wants_full_tagged_references(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="full reference"):
        build_image(tmp_path, name=bad)


def test_platform_parsing() -> None:
    assert Platform.parse("linux/arm/v7") == Platform("linux", "arm", "v7")
    assert str(Platform.parse("linux/amd64")) == "linux/amd64"
    with pytest.raises(ValueError):
        Platform.parse("linux")
