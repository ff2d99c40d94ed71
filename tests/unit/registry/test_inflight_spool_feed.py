"""The feed from upstream pieces into a spool: large writes for a fast upstream, no long wait
for a slow one, in order, and a write's failure reaches the producer."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from services.registry.inflight.spool import Spool, SpoolPool
from services.registry.inflight.spool_feed import SpoolFeed
from tests.harness.fake_inflight import sha256

BLOB = os.urandom(1_000_000)
PIECE = 4096


class CountingSpool(Spool):
    """A real spool that also records the size of each write."""

    def __init__(self, path: Path, digest: str, size: int) -> None:
        super().__init__(path, digest, size)
        self.writes: list[int] = []

    async def write_parts(self, parts: Sequence[bytes]) -> None:
        self.writes.append(sum(len(p) for p in parts))
        await super().write_parts(parts)


def _spool(directory: Path, blob: bytes = BLOB) -> CountingSpool:
    pool = SpoolPool(directory, 10 << 20, grace_s=60)
    pool.open()
    return CountingSpool(directory / "blob.spool", sha256(blob), len(blob))


async def test_a_fast_upstream_is_written_in_batches_in_order(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    feed = SpoolFeed(spool, batch=64 * 1024, flush_s=1.0)
    for i in range(0, len(BLOB), PIECE):
        await feed.add(BLOB[i : i + PIECE])
    await feed.close()
    assert sum(spool.writes) == len(BLOB)
    assert len(spool.writes) < len(BLOB) // PIECE // 4, spool.writes
    assert await spool.finish()
    assert spool.path.read_bytes() == BLOB


async def test_a_lone_piece_is_written_after_the_flush_delay(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    feed = SpoolFeed(spool, batch=64 * 1024, flush_s=0.01)
    await feed.add(BLOB[:100])
    async with asyncio.timeout(5):
        # Readers see the piece without any more upstream bytes (the feed is not closed).
        assert await spool.readable(0, stall_s=5) == 100
    await feed.abort()


async def test_bytes_past_the_blob_fail_the_producer(tmp_path: Path) -> None:
    spool = _spool(tmp_path, BLOB[:1000])
    feed = SpoolFeed(spool, batch=64 * 1024, flush_s=0.001)
    await feed.add(BLOB[:1000])
    await feed.add(b"more")
    with pytest.raises(ValueError, match="more than"):
        await feed.close()
