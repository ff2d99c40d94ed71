"""Builds a ContainerdStore holding a given synthetic image, for the shared store contract suite."""

from __future__ import annotations

import tempfile
from pathlib import Path

from services.common.store.containerd_store import ContainerdStore
from tests.harness.containerd import ContainerdDaemon
from tests.harness.images import BuiltImage


async def import_image(daemon: ContainerdDaemon, namespace: str, image: BuiltImage) -> None:
    """Import `image` (all platforms, every blob) into `namespace` through `ctr images import`."""
    with tempfile.TemporaryDirectory(prefix="pm-import-") as tmp:
        archive = image.write_oci_archive(Path(tmp) / "image.tar")
        await daemon.import_archive_async(archive, namespace=namespace, all_platforms=True)


async def make_containerd_store(
    daemon: ContainerdDaemon, namespace: str, image: BuiltImage
) -> ContainerdStore:
    """A store over `daemon`'s `namespace` in which `image` has been imported; close it after."""
    await import_image(daemon, namespace, image)
    return await ContainerdStore.open(daemon.address, namespace)
