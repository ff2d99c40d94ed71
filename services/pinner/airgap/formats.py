"""Which files of the images directory are importable, and a decompressing reader for each kind."""

from __future__ import annotations

import bz2
import enum
import gzip
from pathlib import Path
from typing import IO, cast

import zstandard

from services.common.errors import InvalidArgumentError

# K3s caps the zstd window at 32 MiB so a hostile archive cannot make the decoder allocate
# gigabytes; the same bound applies here.
ZSTD_MAX_WINDOW = 32 << 20
# A zstd frame header is at most 18 bytes; enough to learn the window size before decoding.
_ZSTD_HEADER_MAX = 18
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
READ_BUFFER = 1 << 20


class FileKind(enum.Enum):
    """How a file in the images directory is read."""

    TAR = "tar"
    GZIP = "tar+gzip"
    ZSTD = "tar+zstd"
    LZ4 = "tar+lz4"
    BZIP2 = "tar+bzip2"
    LIST = "list"


# Longest suffixes first so `.tar.gz` is not mistaken for something ending in `.gz` alone.
_SUFFIXES: tuple[tuple[str, FileKind], ...] = (
    (".tar.gz", FileKind.GZIP),
    (".tgz", FileKind.GZIP),
    (".tar.zst", FileKind.ZSTD),
    (".tzst", FileKind.ZSTD),
    (".tar.lz4", FileKind.LZ4),
    (".tar.bz2", FileKind.BZIP2),
    (".tbz", FileKind.BZIP2),
    (".tar", FileKind.TAR),
    (".txt", FileKind.LIST),
)


class ArchiveFormatError(InvalidArgumentError):
    """The file cannot be read as the kind its name promises (bad header, window too large)."""


def classify(path: Path | str) -> FileKind | None:
    """The kind of an images-directory file by its name; None for files we ignore."""
    name = Path(path).name.lower()
    if name.startswith("."):
        # Editors and copy tools write hidden temporary files next to the real one.
        return None
    for suffix, kind in _SUFFIXES:
        if name.endswith(suffix):
            return kind
    return None


def check_zstd_window(header: bytes, limit: int = ZSTD_MAX_WINDOW) -> int:
    """The window size the first zstd frame of `header` needs; raises when above `limit`."""
    if not header.startswith(_ZSTD_MAGIC):
        raise ArchiveFormatError("not a zstd stream (bad magic number)")
    try:
        params = zstandard.get_frame_parameters(header)
    except zstandard.ZstdError as exc:
        raise ArchiveFormatError(f"invalid zstd frame header: {exc}") from exc
    window = int(params.window_size)
    if window > limit:
        raise ArchiveFormatError(
            f"zstd window of {window} bytes exceeds the {limit} byte limit "
            "(recompress with a smaller --long/window setting)"
        )
    return window


class _ZstdReader:
    """A zstd stream reader that turns the decoder's window error into ArchiveFormatError."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        decoder = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
        self._reader = decoder.stream_reader(raw, read_size=READ_BUFFER, read_across_frames=True)

    def read(self, size: int = -1) -> bytes:
        try:
            return self._reader.read(size)
        except zstandard.ZstdError as exc:
            text = str(exc)
            if "window" in text.lower() or "memory" in text.lower():
                raise ArchiveFormatError(
                    f"zstd frame needs a window above {ZSTD_MAX_WINDOW} bytes: {text}"
                ) from exc
            raise ArchiveFormatError(f"corrupt zstd data: {text}") from exc

    def close(self) -> None:
        self._reader.close()  # type: ignore[no-untyped-call]
        self._raw.close()

    def __enter__(self) -> _ZstdReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_decompressed(path: Path, kind: FileKind) -> IO[bytes]:
    """A binary reader of the tar stream inside `path` (decompressed on the fly, never in full)."""
    if kind is FileKind.LIST:
        raise ValueError("list files are not archives")
    raw = path.open("rb", buffering=READ_BUFFER)
    try:
        if kind is FileKind.TAR:
            return raw
        if kind is FileKind.GZIP:
            return cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="rb"))
        if kind is FileKind.BZIP2:
            return cast(IO[bytes], bz2.BZ2File(raw, mode="rb"))
        if kind is FileKind.LZ4:
            import lz4.frame  # type: ignore[import-untyped]

            return cast(IO[bytes], lz4.frame.LZ4FrameFile(raw, mode="rb"))
        header = raw.read(_ZSTD_HEADER_MAX)
        check_zstd_window(header)
        raw.seek(0)
        return cast(IO[bytes], _ZstdReader(raw))
    except BaseException:
        raw.close()
        raise
