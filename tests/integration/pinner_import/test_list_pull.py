"""`.txt` list files: each reference is pulled through containerd's CRI, so mirrors apply.

A Go `docker-registry` on a loopback port is configured (hosts.toml in the harness containerd's
certs.d) as the mirror of a registry name that does not exist; `server` is http://127.0.0.1:9,
so the pull can only succeed through the mirror and nothing leaves the machine.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.pinner.cri import CRI_NAMESPACE
from tests.harness.containerd import ContainerdDaemon
from tests.harness.ctr_pull import DEAD_SERVER, push
from tests.harness.upstream import (
    DistributionRegistry,
    UpstreamOptions,
    loopback_registry,
)
from tests.integration.pinner_import.helpers import MANAGED, PIN, manager

pytestmark = pytest.mark.containerd

REGISTRY = "registry.example.test"


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[DistributionRegistry]:
    """A docker-registry on 127.0.0.1:<port>."""
    with loopback_registry(tmp_path / "registry", UpstreamOptions(log_level="warn")) as registry:
        yield registry


@pytest.fixture
def mirrored_registry(
    containerd_daemon: ContainerdDaemon, mirror: DistributionRegistry
) -> Iterator[DistributionRegistry]:
    """hosts.toml sending pulls of REGISTRY to the mirror; removed afterwards."""
    host_dir = containerd_daemon.hosts_dir / REGISTRY
    host_dir.mkdir(parents=True, exist_ok=True)
    (host_dir / "hosts.toml").write_text(
        f'server = "{DEAD_SERVER}"\n\n[host."{mirror.url}"]\n  capabilities = ["pull", "resolve"]\n'
    )
    try:
        yield mirror
    finally:
        shutil.rmtree(host_dir, ignore_errors=True)


async def test_list_file_is_pulled_through_cri_mirror_and_pinned(
    tmp_path: Path,
    containerd_daemon: ContainerdDaemon,
    containerd_namespace: str,
    mirrored_registry: DistributionRegistry,
) -> None:
    digest = push(tmp_path, mirrored_registry, named=REGISTRY, repo_tag="listed/app:1")
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    (images_dir / "images.txt").write_text(
        f"# air-gap list\n{REGISTRY}/listed/app:1\n\n{REGISTRY}/listed/absent:1\n"
    )
    try:
        async with manager(containerd_daemon.address, containerd_namespace, images_dir) as airgap:
            await airgap.start()
            cri = airgap.client.with_namespace(CRI_NAMESPACE)
            image = await cri.get_image(f"{REGISTRY}/listed/app:1")
            assert image.target.digest == digest
            assert image.labels[PIN] == "pinned" and image.labels[MANAGED] == "pinned"
            by_digest = await cri.get_image(f"{REGISTRY}/listed/app@{digest}")
            assert by_digest.labels[PIN] == "pinned"
            # The unavailable reference is reported; the available one was still pinned.
            [state] = airgap.status()
            assert state.result == "failed"
            assert "listed/absent:1" in state.error
            assert f"{REGISTRY}/listed/app:1" in state.images

            # Restart without the list: its pins are dropped.
            (images_dir / "images.txt").unlink()
        async with manager(containerd_daemon.address, containerd_namespace, images_dir) as airgap:
            await airgap.start()
            cri = airgap.client.with_namespace(CRI_NAMESPACE)
            labels = (await cri.get_image(f"{REGISTRY}/listed/app:1")).labels
            assert PIN not in labels and MANAGED not in labels
    finally:
        names = [
            n for n in containerd_daemon.image_names(CRI_NAMESPACE) if REGISTRY in n or digest in n
        ]
        if names:
            containerd_daemon.ctr("images", "rm", "--sync", *names, namespace=CRI_NAMESPACE)
