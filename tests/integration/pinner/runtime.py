"""Steps the in-process pinner tests share: a running PinnerRuntime and the keys it advertises."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from services.common.config import NodeConfig
from services.pinner.service import PinnerRuntime, prepare
from tests.harness.fake_discovery import FakeDiscovery
from tests.harness.images import BuiltImage

# Upper bound for slower convergence (restarts, GC); only there so a bug fails instead of hangs.
WAIT_S = 30.0


@contextlib.asynccontextmanager
async def pinner(cfg: NodeConfig, *, airgap: bool = False) -> AsyncIterator[PinnerRuntime]:
    """A pinner runtime on `cfg`, yielded once its first sync is done; stopped on the way out."""
    runtime = PinnerRuntime(cfg, prepare(cfg), airgap=airgap)
    runtime.start()
    try:
        async with asyncio.timeout(WAIT_S):
            await runtime.wait_synced()
        yield runtime
    finally:
        await runtime.stop()


def keys_of(image: BuiltImage, *, tag: bool = True) -> set[str]:
    """What the pinner advertises for `image`: its blobs' digests, and its name if tagged."""
    keys = {b.digest for b in image.blobs}
    if tag:
        keys.add(image.name)
    return keys


async def wait_keys(disco: FakeDiscovery, want: set[str], within: float = WAIT_S) -> None:
    """Until the fake discovery holds exactly `want`."""
    async with asyncio.timeout(within):
        await disco.wait_for(lambda keys: keys == want)
