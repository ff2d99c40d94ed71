"""The in-flight spool: its pure state, waiting readers at any offset, verification, bounds and
removal after the grace period."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.registry.inflight.spool import (
    Spool,
    SpoolPool,
    SpoolStalledError,
    spool_file_name,
)
from services.registry.inflight.spool_state import SpoolFailedError, SpoolPhase, SpoolState
from tests.harness.fake_inflight import sha256
from tests.harness.wait import wait_until

BLOB = os.urandom(300_000)
DIGEST = sha256(BLOB)


# --- pure state ------------------------------------------------------------------------------


def test_last_byte_held_until_verified() -> None:
    state = SpoolState(DIGEST, 10)
    state.accept(10)
    assert state.readable_end() == 9
    assert state.available(9) == 0
    state.complete()
    assert state.available(9) == 1


def test_readers_never_pass_what_was_written() -> None:
    state = SpoolState(DIGEST, 10)
    state.accept(4)
    assert state.available(0) == 4
    assert state.available(6) == 0


def test_writer_cannot_pass_the_size() -> None:
    state = SpoolState(DIGEST, 10)
    state.accept(8)
    with pytest.raises(ValueError, match="more than the 10 bytes"):
        state.accept(3)


def test_failed_state_raises_for_readers_and_stays_failed() -> None:
    state = SpoolState(DIGEST, 10)
    state.fail("upstream went away")
    state.fail("later reason")
    with pytest.raises(SpoolFailedError, match="upstream went away"):
        state.check()
    assert state.phase is SpoolPhase.FAILED


def test_empty_blob_has_nothing_to_hold_back() -> None:
    state = SpoolState(DIGEST, 0)
    assert state.readable_end() == 0


# --- the spool file --------------------------------------------------------------------------


def _spool(directory: Path) -> Spool:
    pool = SpoolPool(directory, 10 << 20, grace_s=60)
    pool.open()
    spool = pool.reserve(DIGEST, len(BLOB))
    assert spool is not None
    return spool


async def _collect(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


async def _write_all(spool: Spool, data: bytes, step: int = 50_000) -> None:
    for i in range(0, len(data), step):
        await spool.write(data[i : i + step])
        await asyncio.sleep(0)  # one loop turn per piece: readers run between the writes


async def test_pieces_written_unjoined_land_in_order_and_verify(tmp_path: Path) -> None:
    """Upstream's pieces go to disk in one vectored write each batch, more pieces than one
    pwritev takes and empty ones included; the file and the hash see them in order."""
    spool = _spool(tmp_path)
    cuts = [0, 7, 7, 1000, *range(1001, 2001), 64 * 1024, 200_000, len(BLOB)]
    parts = [BLOB[a:b] for a, b in itertools.pairwise(cuts)]
    await spool.write_parts(parts[:3])  # small: hashed on the event loop
    await spool.write_parts(parts[3:])  # over a thousand pieces, on a worker thread
    assert spool.state.written == len(BLOB)
    assert await spool.finish()
    assert spool.path.read_bytes() == BLOB


async def test_pieces_past_the_size_are_refused_before_any_is_written(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    with pytest.raises(ValueError, match="more than"):
        await spool.write_parts([BLOB, b"x"])
    assert spool.state.written == 0


async def test_concurrent_readers_at_any_offset_wait_for_bytes(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    whole = asyncio.create_task(_collect(spool.read(0, len(BLOB), 5)))
    # A range far beyond anything written yet.
    tail = asyncio.create_task(_collect(spool.read(250_000, 40_000, 5)))
    await spool.write(BLOB[:100_000])
    await asyncio.sleep(0.05)  # a fixed pause on purpose: shows that neither read finishes early
    assert not tail.done() and not whole.done()
    await _write_all(spool, BLOB[100_000:])
    assert not whole.done(), "the last byte must wait for the digest's verdict"
    assert await spool.finish()
    assert await whole == BLOB
    assert await tail == BLOB[250_000:290_000]
    # A reader arriving after completion reads straight through.
    assert await _collect(spool.read(5, 10, 5)) == BLOB[5:15]


async def test_corrupt_body_aborts_every_reader_before_the_end(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    got: list[list[bytes]] = [[], []]

    async def reader(i: int, offset: int) -> None:
        async for chunk in spool.read(offset, len(BLOB) - offset, 5):
            got[i].append(chunk)

    readers = [asyncio.create_task(reader(0, 0)), asyncio.create_task(reader(1, 123))]
    # The first byte flipped: never the blob (a fixed byte was, once in 256 random blobs).
    await _write_all(spool, bytes([BLOB[0] ^ 0xFF]) + BLOB[1:])
    assert not await spool.finish()
    for task in readers:
        with pytest.raises(SpoolFailedError, match="do not match the digest"):
            await task
    # Neither reader ever received the blob's last byte.
    assert len(b"".join(got[0])) < len(BLOB)
    assert len(b"".join(got[1])) < len(BLOB) - 123


async def test_short_upstream_body_fails_the_spool(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    await spool.write(BLOB[:1000])
    assert not await spool.finish()
    assert "1000 of 300000" in spool.state.error


async def test_reader_stalled_past_its_limit_is_aborted(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    with pytest.raises(SpoolStalledError, match="no new bytes"):
        await _collect(spool.read(0, 10, 0.05))


async def test_range_outside_the_blob_is_refused(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    with pytest.raises(ValueError, match="outside"):
        await _collect(spool.read(len(BLOB) - 5, 10, 1))


# --- the pool ------------------------------------------------------------------------------


async def test_bound_exceeded_means_no_spool(tmp_path: Path) -> None:
    pool = SpoolPool(tmp_path, 500_000, grace_s=60)
    pool.open()
    assert pool.reserve(DIGEST, len(BLOB)) is not None
    assert pool.reserve(sha256(b"other"), 250_000) is None
    assert pool.used_bytes == len(BLOB)
    assert pool.reserve(sha256(b"small"), 100_000) is not None


async def test_complete_spool_removed_after_grace_period(tmp_path: Path) -> None:
    pool = SpoolPool(tmp_path, 10 << 20, grace_s=0.1)
    pool.open()
    spool = pool.reserve(DIGEST, len(BLOB))
    assert spool is not None
    await _write_all(spool, BLOB)
    assert await spool.finish()
    pool.settle(spool)
    path = tmp_path / spool_file_name(DIGEST)
    assert path.exists() and pool.get(DIGEST) is spool
    await wait_until(lambda: not path.exists(), within=10.0)
    assert pool.get(DIGEST) is None and pool.used_bytes == 0


async def test_failed_spool_removed_at_once_but_open_reader_finishes_cleanly(
    tmp_path: Path,
) -> None:
    pool = SpoolPool(tmp_path, 10 << 20, grace_s=60)
    pool.open()
    spool = pool.reserve(DIGEST, len(BLOB))
    assert spool is not None
    reader = asyncio.create_task(_collect(spool.read(0, len(BLOB), 5)))
    await spool.write(BLOB[:1000])
    await spool.fail("upstream refused")
    pool.settle(spool)
    assert not (tmp_path / spool_file_name(DIGEST)).exists()
    assert pool.get(DIGEST) is None
    with pytest.raises(SpoolFailedError, match="upstream refused"):
        await reader


async def test_open_deletes_spools_left_by_a_previous_run_only(tmp_path: Path) -> None:
    leftover = tmp_path / spool_file_name(DIGEST)
    leftover.write_bytes(b"partial")
    unrelated = tmp_path / "notes.txt"
    unrelated.write_text("keep")
    SpoolPool(tmp_path, 1 << 20, grace_s=1).open()
    assert not leftover.exists()
    assert unrelated.exists()
