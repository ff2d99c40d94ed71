"""containerd 1.6's `ctr images import` accepts every archive form the image builder writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.harness.containerd import ContainerdDaemon
from tests.harness.images import build_image

pytestmark = pytest.mark.containerd


def content_digests(daemon: ContainerdDaemon, namespace: str) -> set[str]:
    out = daemon.ctr("content", "list", "--quiet", namespace=namespace)
    return {line for line in out.splitlines() if line}


def image_target(daemon: ContainerdDaemon, namespace: str, name: str) -> str:
    for line in daemon.ctr("images", "list", namespace=namespace).splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == name:
            return fields[2]
    raise AssertionError(f"{name} not imported; images: {daemon.image_names(namespace)}")


@pytest.mark.parametrize("media", ["oci", "docker"])
def test_oci_archive_imports_every_platform_under_its_name(
    containerd_daemon: ContainerdDaemon, containerd_namespace: str, tmp_path: Path, media: str
) -> None:
    image = build_image(
        tmp_path / "src",
        name="127.0.0.1:5000/team/imported:v1",
        platforms=["linux/amd64", "linux/arm64/v8"],
        media="oci" if media == "oci" else "docker",
    )
    archive = image.write_oci_archive(tmp_path / "image.tar")
    containerd_daemon.import_archive(archive, containerd_namespace, all_platforms=True)
    assert image_target(containerd_daemon, containerd_namespace, image.name) == image.target.digest
    assert {b.digest for b in image.blobs} <= content_digests(
        containerd_daemon, containerd_namespace
    )


def test_unpacking_proves_layers_are_real_tars(
    containerd_daemon: ContainerdDaemon, containerd_namespace: str, tmp_path: Path
) -> None:
    image = build_image(tmp_path / "src", name="docker.io/library/unpack:1", layers=2)
    archive = image.write_oci_archive(tmp_path / "image.tar")
    out = containerd_daemon.import_archive(archive, containerd_namespace, unpack=True)
    assert "done" in out
    snapshots = containerd_daemon.ctr("snapshots", "list", namespace=containerd_namespace)
    # One committed snapshot per layer.
    assert len([line for line in snapshots.splitlines()[1:] if "Committed" in line]) == 2


def test_docker_save_archive_imports_with_its_config_and_layers(
    containerd_daemon: ContainerdDaemon, containerd_namespace: str, tmp_path: Path
) -> None:
    image = build_image(tmp_path / "src", name="docker.io/library/saved:2.0", layers=2)
    saved = image.write_docker_archive(tmp_path / "saved.tar")
    assert saved.repo_tag == "saved:2.0"
    containerd_daemon.import_archive(saved.path, containerd_namespace)
    # containerd writes its own manifest for docker-save input, pointing at our config and layers.
    target = image_target(containerd_daemon, containerd_namespace, image.name)
    manifest = json.loads(
        containerd_daemon.ctr("content", "get", target, namespace=containerd_namespace)
    )
    assert manifest["config"]["digest"] == saved.config.digest
    assert [layer["digest"] for layer in manifest["layers"]] == [d.digest for d in saved.layers]
    held = content_digests(containerd_daemon, containerd_namespace)
    assert saved.config.digest in held
    assert {layer.digest for layer in saved.layers} <= held
