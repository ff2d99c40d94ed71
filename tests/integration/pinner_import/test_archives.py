"""Every archive format and compression imports a multi-arch image completely, or not at all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.common.containerd.client import ContainerdClient
from services.pinner.airgap.formats import ZSTD_MAX_WINDOW
from tests.harness.containerd import ContainerdDaemon
from tests.harness.images import BuiltImage
from tests.integration.pinner_import.helpers import (
    MANAGED,
    PIN,
    SUFFIXES,
    docker_archive,
    manager,
    multiarch_image,
    oci_archive,
)

pytestmark = pytest.mark.containerd

SOURCE = "containerd.io/distribution.source.registry.example.test"
GC_PREFIX = "containerd.io/gc.ref.content."


async def assert_pinned_record(client: ContainerdClient, name: str, digest: str) -> None:
    image = await client.get_image(name)
    assert image.target.digest == digest
    assert image.labels[PIN] == "pinned"
    assert image.labels[MANAGED] == "pinned"


@pytest.mark.parametrize("suffix", SUFFIXES)
async def test_oci_archive_imports_every_platform(
    suffix: str, tmp_path: Path, containerd_daemon: ContainerdDaemon, containerd_namespace: str
) -> None:
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    name = "registry.example.test/team/app:1.0"
    image = oci_archive(tmp_path, images_dir, name, suffix)
    async with manager(containerd_daemon.address, containerd_namespace, images_dir) as airgap:
        assert await airgap.start() == 1
        client = airgap.client
        await assert_pinned_record(client, name, image.target.digest)
        await assert_pinned_record(
            client, f"registry.example.test/team/app@{image.target.digest}", image.target.digest
        )
        # Every blob of every platform is present, labelled with its source repository.
        for blob in image.blobs:
            info = await client.content_info(blob.digest)
            assert info.size == blob.size
            assert info.labels[SOURCE] == "team/app"
        await assert_gc_refs(client, image)
        [state] = airgap.status()
        assert state.result == "imported"
        assert name in state.images


async def assert_gc_refs(client: ContainerdClient, image: BuiltImage) -> None:
    """The index references every manifest, each manifest its config and layers (GC keeps them)."""
    index = await client.content_info(image.target.digest)
    refs = {v for k, v in index.labels.items() if k.startswith(GC_PREFIX)}
    assert refs == {p.manifest.digest for p in image.platforms}
    for plat in image.platforms:
        info = await client.content_info(plat.manifest.digest)
        refs = {v for k, v in info.labels.items() if k.startswith(GC_PREFIX)}
        assert refs == {plat.config.digest, *(layer.descriptor.digest for layer in plat.layers)}


@pytest.mark.parametrize("suffix", SUFFIXES)
async def test_docker_save_archive_imports_with_a_synthesised_manifest(
    suffix: str, tmp_path: Path, containerd_daemon: ContainerdDaemon, containerd_namespace: str
) -> None:
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    archive = docker_archive(tmp_path, images_dir, "docker.io/library/tool:2", suffix)
    async with manager(containerd_daemon.address, containerd_namespace, images_dir) as airgap:
        assert await airgap.start() == 1
        client = airgap.client
        image = await client.get_image("docker.io/library/tool:2")
        assert image.labels[PIN] == "pinned"
        assert image.target.media_type == "application/vnd.docker.distribution.manifest.v2+json"
        manifest = json.loads(b"".join([c async for c in client.read_content(image.target.digest)]))
        assert manifest["config"]["digest"] == archive.config.digest
        assert [layer["digest"] for layer in manifest["layers"]] == [
            d.digest for d in archive.layers
        ]
        assert {layer["mediaType"] for layer in manifest["layers"]} == {
            "application/vnd.docker.image.rootfs.diff.tar"
        }
        await assert_pinned_record(
            client, f"docker.io/library/tool@{image.target.digest}", image.target.digest
        )
        for desc in (archive.config, *archive.layers):
            info = await client.content_info(desc.digest)
            assert info.labels["containerd.io/distribution.source.docker.io"] == "library/tool"
    # containerd itself agrees the image is complete.
    out = containerd_daemon.ctr("images", "check", namespace=containerd_namespace)
    line = next(ln for ln in out.splitlines() if ln.startswith("docker.io/library/tool:2"))
    assert "complete" in line


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".tar.zst"])
async def test_truncated_archive_leaves_nothing_behind(
    suffix: str, tmp_path: Path, containerd_daemon: ContainerdDaemon, containerd_namespace: str
) -> None:
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    image = oci_archive(tmp_path, images_dir, "registry.example.test/cut:1", ".tar")
    whole = next(images_dir.iterdir())
    data = whole.read_bytes()
    whole.unlink()
    cut = tmp_path / "cut.tar"
    # Cut inside the last blob: index.json and most blobs arrive, the image cannot be complete.
    cut.write_bytes(data[: len(data) * 3 // 4])
    from tests.integration.pinner_import.helpers import compress

    target = compress(cut, images_dir / f"cut{suffix}")
    async with manager(containerd_daemon.address, containerd_namespace, images_dir) as airgap:
        assert await airgap.start() == 0
        [state] = airgap.status()
        assert state.path == target
        assert state.result == "failed"
        assert state.error
        assert await airgap.client.list_images() == []
        # The lease was released with a synchronous collection: no blob of it stayed.
        present = {info.digest for info in await airgap.client.list_content()}
        assert present.isdisjoint({blob.digest for blob in image.blobs})


async def test_zstd_window_above_32_mib_is_rejected(
    tmp_path: Path, containerd_daemon: ContainerdDaemon, containerd_namespace: str
) -> None:
    import zstandard

    images_dir = tmp_path / "images"
    images_dir.mkdir()
    image = multiarch_image(tmp_path, "registry.example.test/wide:1")
    tar = image.write_oci_archive(tmp_path / "wide.tar")
    params = zstandard.ZstdCompressionParameters.from_level(1, window_log=27)
    with tar.open("rb") as src, (images_dir / "wide.tar.zst").open("wb") as dst:
        # Streaming (size unknown) keeps the declared 128 MiB window in the frame header.
        zstandard.ZstdCompressor(compression_params=params).copy_stream(src, dst)
    async with manager(containerd_daemon.address, containerd_namespace, images_dir) as airgap:
        assert await airgap.start() == 0
        [state] = airgap.status()
        assert state.result == "failed"
        assert "window" in state.error and str(ZSTD_MAX_WINDOW) in state.error
        assert await airgap.client.list_images() == []
