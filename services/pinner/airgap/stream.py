"""Reads the regular files of a tar archive in a worker thread and hands them to the event loop.

Decompression and tar parsing are blocking and CPU-bound, so they run in one thread while the
event loop sends the bytes to containerd: the two overlap, and only a few chunks are ever held
in memory (a semaphore bounds how far the reader may run ahead).
"""

from __future__ import annotations

import asyncio
import hashlib
import tarfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from services.common.errors import InvalidArgumentError, PeermirrorError
from services.pinner.airgap.formats import ArchiveFormatError, FileKind, open_decompressed

CHUNK_BYTES = 1 << 20
# How many chunks the reader may be ahead of the consumer (memory bound: DEPTH MiB).
DEPTH = 8
_POLL_S = 0.1


class ArchiveReadError(InvalidArgumentError):
    """The archive is corrupt, truncated or not a tar; the message says where it broke."""


@dataclass(frozen=True, slots=True)
class MemberStart:
    """A regular file of the archive begins; its bytes follow as `bytes` items."""

    name: str
    size: int


@dataclass(frozen=True, slots=True)
class MemberEnd:
    """The current file ended; `digest` is its sha256 when the file was hashed, else None."""

    digest: str | None


StreamItem = MemberStart | bytes | MemberEnd


@dataclass(frozen=True, slots=True)
class _Failed:
    error: BaseException


class _Done:
    pass


_DONE = _Done()


def normalize_member_name(name: str) -> str:
    """Archive member path without leading `./` or `/` (tools write either)."""
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


class TarStream:
    """Async iterator over an archive's regular files: MemberStart, chunks, MemberEnd, ...

    `hash_member(name)` says which files the reader thread should hash while reading (hashing
    there keeps the event loop free). Use as `async with TarStream(...) as stream: async for ...`;
    leaving the block early stops the reader thread.
    """

    def __init__(
        self,
        path: Path,
        kind: FileKind,
        *,
        hash_member: Callable[[str], bool],
        chunk_bytes: int = CHUNK_BYTES,
        depth: int = DEPTH,
    ) -> None:
        self._path = path
        self._kind = kind
        self._hash_member = hash_member
        self._chunk = chunk_bytes
        self._slots = threading.Semaphore(depth)
        self._stop = threading.Event()
        self._queue: asyncio.Queue[StreamItem | _Failed | _Done] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._finished = False

    async def __aenter__(self) -> TarStream:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(
            target=self._run, name=f"tar-reader:{self._path.name}", daemon=True
        )
        self._thread.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None:
            await asyncio.to_thread(thread.join)

    def __aiter__(self) -> TarStream:
        return self

    async def __anext__(self) -> StreamItem:
        if self._finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        self._slots.release()
        if isinstance(item, _Done):
            self._finished = True
            raise StopAsyncIteration
        if isinstance(item, _Failed):
            self._finished = True
            raise item.error
        return item

    # --- reader thread ------------------------------------------------------------------------

    def _put(self, item: StreamItem | _Failed | _Done) -> None:
        while not self._slots.acquire(timeout=_POLL_S):
            if self._stop.is_set():
                raise _Stopped
        if self._stop.is_set():
            raise _Stopped
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def _run(self) -> None:
        try:
            self._read_all()
            self._put(_DONE)
        except _Stopped:
            return
        except ArchiveFormatError as exc:
            self._report(ArchiveReadError(f"{self._path.name}: {exc}"))
        except (tarfile.TarError, EOFError, OSError, ValueError, RuntimeError) as exc:
            self._report(ArchiveReadError(f"{self._path.name}: corrupt or truncated: {exc}"))
        except BaseException as exc:  # the consumer must hear of any failure, or it waits forever
            self._report(exc)

    def _report(self, error: BaseException) -> None:
        try:
            self._put(_Failed(error))
        except _Stopped:
            pass
        except RuntimeError:
            # The event loop closed under us: nobody is left to tell.
            pass

    def _read_all(self) -> None:
        # Stream mode ("r|"): one forward pass, no seeking, members in archive order.
        with (
            open_decompressed(self._path, self._kind) as raw,
            tarfile.open(fileobj=raw, mode="r|", bufsize=self._chunk) as tar,
        ):
            for member in tar:
                if self._stop.is_set():
                    raise _Stopped
                if not member.isfile():
                    continue
                name = normalize_member_name(member.name)
                extracted = tar.extractfile(member)
                assert extracted is not None
                self._copy_member(name, member.size, extracted)

    def _copy_member(self, name: str, size: int, data: IO[bytes]) -> None:
        self._put(MemberStart(name, size))
        hasher = hashlib.sha256() if self._hash_member(name) else None
        remaining = size
        while remaining > 0:
            chunk = data.read(min(self._chunk, remaining))
            if not chunk:
                raise ArchiveReadError(
                    f"{self._path.name}: {name} ends {remaining} bytes early (truncated archive)"
                )
            if hasher is not None:
                hasher.update(chunk)
            remaining -= len(chunk)
            self._put(chunk)
        self._put(MemberEnd(None if hasher is None else "sha256:" + hasher.hexdigest()))


class _Stopped(PeermirrorError):
    """The consumer left; the reader thread unwinds quietly."""

    def __init__(self) -> None:
        super().__init__("the consumer left")
