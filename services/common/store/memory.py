"""In-memory content store: a fast fake for unit tests, driven directly by the test."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

from services.common.oci.document import digest_of
from services.common.store.protocol import (
    ContentNotFoundError,
    Descriptor,
    EventKind,
    ImageRecord,
    StoreEvent,
)

DEFAULT_READ_CHUNK = 64 * 1024


class _QueueWatcher:
    """One `watch()` iterator: the store pushes events into its queue, None ends it."""

    def __init__(self, store: MemoryStore) -> None:
        self._store = store
        self._queue: asyncio.Queue[StoreEvent | None] = asyncio.Queue()
        self._closed = False

    def push(self, event: StoreEvent | None) -> None:
        self._queue.put_nowait(event)

    def __aiter__(self) -> _QueueWatcher:
        return self

    async def __anext__(self) -> StoreEvent:
        if self._closed:
            raise StopAsyncIteration
        event = await self._queue.get()
        if event is None:
            self._closed = True
            raise StopAsyncIteration
        return event

    async def ready(self) -> bool:
        """In force from creation: the store pushes every later mutation."""
        return True

    async def aclose(self) -> None:
        """Stop receiving; a pending `__anext__` ends the iteration."""
        self._store._watchers.discard(self)
        self.push(None)


class MemoryStore:
    """A ContentStore held in dicts; every mutation is reported to watchers at once.

    Meant for one event loop: mutators are plain methods called from that loop's thread.
    `read` yields `read_chunk`-sized pieces so consumers meet multi-chunk streams.
    """

    def __init__(self, *, read_chunk: int = DEFAULT_READ_CHUNK) -> None:
        self.read_chunk = read_chunk
        self._blobs: dict[str, bytes] = {}
        self._images: dict[str, ImageRecord] = {}
        self._watchers: set[_QueueWatcher] = set()

    # --- mutators -------------------------------------------------------------------------

    def add_blob(self, data: bytes, algorithm: str = "sha256") -> str:
        """Store `data` under its digest (`sha256` or `sha512`); returns the digest."""
        if algorithm not in ("sha256", "sha512"):
            raise ValueError(f"unsupported digest algorithm {algorithm!r}")
        digest = digest_of(data, algorithm)
        self._blobs[digest] = bytes(data)
        return digest

    def delete_blob(self, digest: str) -> None:
        """Remove content `digest` (ContentNotFoundError when absent) and report CONTENT_DELETE."""
        if self._blobs.pop(digest, None) is None:
            raise ContentNotFoundError(digest)
        self._emit(StoreEvent(EventKind.CONTENT_DELETE, digest))

    def set_image(
        self, name: str, target: Descriptor, labels: Mapping[str, str] | None = None
    ) -> EventKind | None:
        """Create or replace image `name`; reports and returns IMAGE_CREATE or IMAGE_UPDATE.

        Setting exactly what is already there changes nothing and returns None.
        """
        record = ImageRecord(name, target, dict(labels or {}))
        previous = self._images.get(name)
        if previous == record:
            return None
        self._images[name] = record
        kind = EventKind.IMAGE_CREATE if previous is None else EventKind.IMAGE_UPDATE
        self._emit(StoreEvent(kind, name))
        return kind

    def delete_image(self, name: str) -> None:
        """Remove image `name` (ContentNotFoundError when absent) and report IMAGE_DELETE."""
        if self._images.pop(name, None) is None:
            raise ContentNotFoundError(name)
        self._emit(StoreEvent(EventKind.IMAGE_DELETE, name))

    def _emit(self, event: StoreEvent) -> None:
        for watcher in list(self._watchers):
            watcher.push(event)

    # --- ContentStore -----------------------------------------------------------------------

    async def resolve(self, reference: str) -> Descriptor:
        record = self._images.get(reference)
        if record is None:
            raise ContentNotFoundError(reference)
        return record.target

    async def stat(self, digest: str) -> int:
        data = self._blobs.get(digest)
        if data is None:
            raise ContentNotFoundError(digest)
        return len(data)

    async def read(
        self, digest: str, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        """Stream the range (cut at the end of the blob; empty when offset lies past it)."""
        if offset < 0 or (length is not None and length < 0):
            raise ValueError(f"bad range offset={offset} length={length}")
        data = self._blobs.get(digest)
        if data is None:
            raise ContentNotFoundError(digest)
        end = len(data) if length is None else min(len(data), offset + length)
        for pos in range(offset, end, self.read_chunk):
            yield data[pos : min(pos + self.read_chunk, end)]
            # Yield to the loop between chunks, as a real store would.
            await asyncio.sleep(0)

    def local_path(self, digest: str) -> Path | None:
        return None

    async def list_images(self) -> list[ImageRecord]:
        return [self._images[name] for name in sorted(self._images)]

    async def digests(self) -> set[str]:
        return set(self._blobs)

    def watch(self) -> _QueueWatcher:
        """Every mutation after this call is reported, in order."""
        watcher = _QueueWatcher(self)
        self._watchers.add(watcher)
        return watcher

    async def close(self) -> None:
        for watcher in list(self._watchers):
            await watcher.aclose()
