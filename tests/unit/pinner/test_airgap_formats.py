"""File classification, decompressing readers and the zstd window limit."""

from __future__ import annotations

import bz2
import gzip
import io
import tarfile
from pathlib import Path

import lz4.frame  # type: ignore[import-untyped]
import pytest
import zstandard

from services.pinner.airgap.formats import (
    ZSTD_MAX_WINDOW,
    ArchiveFormatError,
    FileKind,
    check_zstd_window,
    classify,
    open_decompressed,
)
from services.pinner.airgap.stream import (
    ArchiveReadError,
    MemberEnd,
    MemberStart,
    TarStream,
    normalize_member_name,
)


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("a.tar", FileKind.TAR),
        ("a.tar.gz", FileKind.GZIP),
        ("A.TGZ", FileKind.GZIP),
        ("a.tar.zst", FileKind.ZSTD),
        ("a.tzst", FileKind.ZSTD),
        ("a.tar.lz4", FileKind.LZ4),
        ("a.tar.bz2", FileKind.BZIP2),
        ("a.tbz", FileKind.BZIP2),
        ("list.txt", FileKind.LIST),
        ("a.gz", None),
        ("a.zip", None),
        (".a.tar", None),
        ("README", None),
    ],
)
def test_classify(name: str, kind: FileKind | None) -> None:
    assert classify(name) is kind


def _tar_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


COMPRESSORS = {
    "a.tar": lambda b: b,
    "a.tar.gz": gzip.compress,
    "a.tar.bz2": bz2.compress,
    "a.tar.lz4": lz4.frame.compress,
    "a.tar.zst": lambda b: zstandard.ZstdCompressor().compress(b),
}


@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_open_decompressed_round_trips(name: str, tmp_path: Path) -> None:
    raw = _tar_bytes({"x": b"hello" * 1000})
    path = tmp_path / name
    path.write_bytes(COMPRESSORS[name](raw))
    kind = classify(path)
    assert kind is not None
    with open_decompressed(path, kind) as f:
        assert f.read() == raw


def test_zstd_window_limit() -> None:
    params = zstandard.ZstdCompressionParameters.from_level(1, window_log=27)
    cctx = zstandard.ZstdCompressor(compression_params=params)
    wide = io.BytesIO()
    cctx.copy_stream(io.BytesIO(b"x" * 100), wide)
    with pytest.raises(ArchiveFormatError, match="window"):
        check_zstd_window(wide.getvalue()[:18])
    narrow = zstandard.ZstdCompressor().compress(b"x" * 100)
    assert check_zstd_window(narrow[:18]) <= ZSTD_MAX_WINDOW
    with pytest.raises(ArchiveFormatError, match="magic"):
        check_zstd_window(b"not zstd at all")


@pytest.mark.parametrize(
    ("member", "normal"), [("./a/b", "a/b"), ("/x", "x"), ("././y", "y"), ("z", "z")]
)
def test_normalize_member_name(member: str, normal: str) -> None:
    assert normalize_member_name(member) == normal


async def test_tar_stream_yields_members_and_digests(tmp_path: Path) -> None:
    path = tmp_path / "a.tar.gz"
    path.write_bytes(gzip.compress(_tar_bytes({"./one": b"1" * 3000, "blobs/two": b"22"})))
    items: list[object] = []
    async with TarStream(
        path, FileKind.GZIP, hash_member=lambda n: n == "one", chunk_bytes=1024
    ) as stream:
        async for item in stream:
            items.append(item)
    assert items[0] == MemberStart("one", 3000)
    assert b"".join(i for i in items[1:4] if isinstance(i, bytes)) == b"1" * 3000
    import hashlib

    assert items[4] == MemberEnd("sha256:" + hashlib.sha256(b"1" * 3000).hexdigest())
    assert items[5:] == [MemberStart("blobs/two", 2), b"22", MemberEnd(None)]


async def test_tar_stream_reports_truncation(tmp_path: Path) -> None:
    raw = _tar_bytes({"big": bytes(100_000)})
    path = tmp_path / "cut.tar"
    path.write_bytes(raw[:50_000])
    with pytest.raises(ArchiveReadError, match=r"cut\.tar"):
        async with TarStream(path, FileKind.TAR, hash_member=lambda n: True) as stream:
            async for _ in stream:
                pass


async def test_tar_stream_stops_reader_when_left_early(tmp_path: Path) -> None:
    path = tmp_path / "many.tar"
    path.write_bytes(_tar_bytes({f"f{i}": bytes(4096) for i in range(200)}))
    async with TarStream(path, FileKind.TAR, hash_member=lambda n: False, depth=2) as stream:
        async for item in stream:
            if isinstance(item, MemberEnd):
                break
    # Leaving the block joined the reader thread although most of the archive was unread.
    assert stream._thread is not None and not stream._thread.is_alive()
