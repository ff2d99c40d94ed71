"""Restart semantics (removed file -> unpinned) and files added while the watcher runs."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from services.pinner.airgap import AirgapManager
from tests.harness.containerd import ContainerdDaemon
from tests.harness.wait import wait_until
from tests.integration.pinner_import.helpers import MANAGED, PIN, manager, oci_archive

pytestmark = pytest.mark.containerd

# The acceptance bound for a new file to be imported and pinned (2 s settle included).
NEW_FILE_BOUND_S = 5.0


async def test_removed_file_is_unpinned_at_restart_and_others_stay(
    tmp_path: Path, containerd_daemon: ContainerdDaemon, containerd_namespace: str
) -> None:
    images_dir = tmp_path / "images"
    (images_dir / "sub").mkdir(parents=True)
    keep = oci_archive(tmp_path, images_dir / "sub", "registry.example.test/keep:1", ".tar.gz", 1)
    drop = oci_archive(tmp_path, images_dir, "registry.example.test/drop:1", ".tar", 2)
    async with manager(containerd_daemon.address, containerd_namespace, images_dir) as airgap:
        assert await airgap.start() == 2
        manual = "registry.example.test/drop@" + drop.target.digest
        assert (await airgap.client.get_image(manual)).labels[MANAGED] == "pinned"
    next(images_dir.glob("drop*")).unlink()
    async with manager(containerd_daemon.address, containerd_namespace, images_dir) as airgap:
        assert await airgap.start() == 1
        client = airgap.client
        for name in ("registry.example.test/drop:1", manual):
            labels = (await client.get_image(name)).labels
            assert PIN not in labels and MANAGED not in labels
        for name in (
            "registry.example.test/keep:1",
            f"registry.example.test/keep@{keep.target.digest}",
        ):
            labels = (await client.get_image(name)).labels
            assert labels[PIN] == "pinned" and labels[MANAGED] == "pinned"
        assert {p.name for p in await airgap.pins.pinned()} == {
            "registry.example.test/keep:1",
            f"registry.example.test/keep@{keep.target.digest}",
        }


async def test_manual_pin_survives_restart(
    tmp_path: Path, containerd_daemon: ContainerdDaemon, containerd_namespace: str
) -> None:
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    oci_archive(tmp_path, images_dir, "registry.example.test/hand:1", ".tar")
    async with manager(containerd_daemon.address, containerd_namespace, images_dir) as airgap:
        await airgap.start()
        await airgap.pins.unpin("registry.example.test/hand:1")
        pin = await airgap.pins.pin("registry.example.test/hand:1")
        assert not pin.managed
    next(images_dir.iterdir()).unlink()
    async with manager(containerd_daemon.address, containerd_namespace, images_dir) as airgap:
        await airgap.start()
        labels = (await airgap.client.get_image("registry.example.test/hand:1")).labels
        assert labels[PIN] == "pinned"
        assert MANAGED not in labels


async def wait_pinned(airgap: AirgapManager, name: str, bound: float) -> None:
    async def pinned() -> bool:
        return name in {p.name for p in await airgap.pins.pinned() if p.managed}

    await wait_until(pinned, within=bound, interval=0.1)


async def test_file_added_while_running_is_imported_and_pinned(
    tmp_path: Path, containerd_daemon: ContainerdDaemon, containerd_namespace: str
) -> None:
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    staging = tmp_path / "staging"
    staging.mkdir()
    async with manager(
        containerd_daemon.address, containerd_namespace, images_dir, poll_interval=0.5
    ) as airgap:
        assert await airgap.start() == 0
        watcher = asyncio.create_task(airgap.run())
        try:
            oci_archive(tmp_path, staging, "registry.example.test/late:1", ".tar.zst")
            (images_dir / "nested").mkdir()
            next(staging.iterdir()).rename(images_dir / "nested" / "late.tar.zst")
            await wait_pinned(airgap, "registry.example.test/late:1", NEW_FILE_BOUND_S)
            # The file's status is recorded after its images are pinned: on a loaded machine a
            # look right after the pin can still find it pending.
            await wait_until(lambda: airgap.status()[0].result != "pending", NEW_FILE_BOUND_S)
            [state] = airgap.status()
            assert state.result == "imported"
            assert "registry.example.test/late:1" in state.images
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
