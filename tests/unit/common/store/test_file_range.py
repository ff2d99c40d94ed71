"""read_range: a file's byte range in chunks, its descriptor closed at the end."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from services.common.store.file_range import read_range

DATA = bytes(range(256)) * 40  # 10,240 bytes


def _open(tmp_path: Path, data: bytes = DATA) -> int:
    path = tmp_path / "blob"
    path.write_bytes(data)
    return os.open(path, os.O_RDONLY)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


class Shrank(Exception):
    pass


async def _collect(fd: int, start: int, end: int, chunk: int) -> list[bytes]:
    return [piece async for piece in read_range(fd, start, end, chunk, Shrank)]


async def test_a_range_comes_in_chunks_and_the_descriptor_is_closed_after(tmp_path: Path) -> None:
    fd = _open(tmp_path)
    pieces = await _collect(fd, 100, 5_000, 1_024)
    assert b"".join(pieces) == DATA[100:5_000]
    assert [len(p) for p in pieces] == [1_024] * 4 + [804]
    assert not _is_open(fd)


async def test_an_empty_range_reads_nothing_and_closes(tmp_path: Path) -> None:
    fd = _open(tmp_path)
    assert await _collect(fd, 7, 7, 1_024) == []
    assert not _is_open(fd)


async def test_a_file_shorter_than_the_range_raises_what_the_caller_names(
    tmp_path: Path,
) -> None:
    fd = _open(tmp_path, DATA[:3_000])
    pieces: list[bytes] = []
    with pytest.raises(Shrank):
        async for piece in read_range(fd, 0, 5_000, 1_024, Shrank):
            pieces.append(piece)
    assert b"".join(pieces) == DATA[:3_000]
    assert not _is_open(fd)


async def test_stopping_early_closes_the_descriptor(tmp_path: Path) -> None:
    fd = _open(tmp_path)
    chunks = read_range(fd, 0, 4_096, 1_024, Shrank)
    async with contextlib.aclosing(chunks):
        assert await anext(chunks) == DATA[:1_024]
        assert _is_open(fd)
    assert not _is_open(fd)
