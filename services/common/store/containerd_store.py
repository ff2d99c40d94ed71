"""The content store backed by a node's containerd: its images, its blobs, its change events."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

from services.common.containerd.client import (
    DEFAULT_ADDRESS,
    DEFAULT_NAMESPACE,
    ContainerdClient,
    EventStream,
)
from services.common.containerd.models import (
    TOPIC_CONTENT_DELETE,
    TOPIC_IMAGE_CREATE,
    TOPIC_IMAGE_DELETE,
    TOPIC_IMAGE_UPDATE,
    ContentDeleted,
    Envelope,
    ImageCreated,
    ImageDeleted,
    ImageUpdated,
)
from services.common.store.protocol import (
    Descriptor,
    EventKind,
    ImageRecord,
    NotFoundError,
    StoreEvent,
)

# Only digests of this exact shape become file paths, so no input can point outside the store.
_DIGEST_RE = re.compile(r"^(?:sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$")

READ_CHUNK_BYTES = 1 << 20

WATCH_TOPICS = (TOPIC_IMAGE_CREATE, TOPIC_IMAGE_UPDATE, TOPIC_IMAGE_DELETE, TOPIC_CONTENT_DELETE)


def store_event(envelope: Envelope) -> StoreEvent | None:
    """The store event for a containerd event, None for events the store does not report."""
    event = envelope.event
    if isinstance(event, ImageCreated):
        return StoreEvent(EventKind.IMAGE_CREATE, event.name)
    if isinstance(event, ImageUpdated):
        return StoreEvent(EventKind.IMAGE_UPDATE, event.name)
    if isinstance(event, ImageDeleted):
        return StoreEvent(EventKind.IMAGE_DELETE, event.name)
    if isinstance(event, ContentDeleted):
        return StoreEvent(EventKind.CONTENT_DELETE, event.digest)
    return None


def read_window(size: int, offset: int, length: int | None) -> tuple[int, int]:
    """The `[start, end)` byte window of a read of `length` from `offset` in a blob of `size`.

    A window past the end is empty; negative offsets or lengths are refused.
    """
    if offset < 0 or (length is not None and length < 0):
        raise ValueError(f"invalid read window: offset={offset} length={length}")
    end = size if length is None else min(size, offset + length)
    start = min(offset, size)
    return start, max(start, end)


class ContainerdWatch:
    """Store events from a containerd subscription that is requested at creation."""

    def __init__(self, stream: EventStream) -> None:
        self._stream = stream

    def __aiter__(self) -> ContainerdWatch:
        return self

    async def __anext__(self) -> StoreEvent:
        while True:
            envelope = await self._stream.__anext__()
            event = store_event(envelope)
            if event is not None:
                return event

    async def aclose(self) -> None:
        self._stream.close()


class ContainerdStore:
    """ContentStore over containerd's gRPC API, reading blob files directly when it can.

    Blob files under the content root are shared by all namespaces, so every read first asks
    containerd whether this namespace holds the digest (one Info call) and only then opens the
    file. `local_path()` cannot ask (it is synchronous): callers `stat()` first, as the registry
    does for Content-Length anyway.
    """

    def __init__(
        self,
        client: ContainerdClient,
        content_root: Path | None = None,
        *,
        owns_client: bool = False,
    ) -> None:
        self.client = client
        self.content_root = content_root
        self._owns_client = owns_client
        self._watches: set[ContainerdWatch] = set()

    @classmethod
    async def open(
        cls,
        address: str = DEFAULT_ADDRESS,
        namespace: str = DEFAULT_NAMESPACE,
        content_root: Path | None = None,
        *,
        fast_path: bool = True,
    ) -> ContainerdStore:
        """Connect to containerd; the content root comes from introspection unless given.

        With `fast_path=False` every read goes through gRPC (for a containerd whose files this
        process cannot see, e.g. in another mount namespace).
        """
        client = ContainerdClient(address, namespace)
        try:
            if fast_path and content_root is None:
                content_root = await client.content_root()
        except BaseException:
            await client.close()
            raise
        return cls(client, content_root if fast_path else None, owns_client=True)

    async def resolve(self, reference: str) -> Descriptor:
        return (await self.client.get_image(reference)).target

    async def stat(self, digest: str) -> int:
        if not _DIGEST_RE.match(digest):
            raise NotFoundError(digest)
        return (await self.client.content_info(digest)).size

    async def read(
        self, digest: str, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        size = await self.stat(digest)
        start, end = read_window(size, offset, length)
        if start == end:
            return
        path = self.local_path(digest)
        if path is not None:
            try:
                fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
            except FileNotFoundError:
                pass
            else:
                try:
                    async for chunk in self._read_file(fd, start, end, digest):
                        yield chunk
                finally:
                    os.close(fd)
                return
        async for chunk in self.client.read_content(digest, start, end - start):
            yield chunk

    @staticmethod
    async def _read_file(fd: int, start: int, end: int, digest: str) -> AsyncIterator[bytes]:
        position = start
        while position < end:
            chunk = await asyncio.to_thread(
                os.pread, fd, min(READ_CHUNK_BYTES, end - position), position
            )
            if not chunk:
                # containerd never truncates a committed blob; a short file means it was removed.
                raise NotFoundError(digest)
            position += len(chunk)
            yield chunk

    def local_path(self, digest: str) -> Path | None:
        if self.content_root is None or not _DIGEST_RE.match(digest):
            return None
        algorithm, _, encoded = digest.partition(":")
        path = self.content_root / "blobs" / algorithm / encoded
        return path if path.is_file() else None

    async def list_images(self) -> list[ImageRecord]:
        return [
            ImageRecord(name=image.name, target=image.target, labels=image.labels)
            for image in await self.client.list_images()
        ]

    def watch(self) -> ContainerdWatch:
        """Image and content-delete events of this namespace.

        The subscription is requested here, before the first iteration; containerd gives no sign
        of when it is in force, so a change made in the same instant may be missed.
        """
        stream = self.client.subscribe(*(f'topic=="{t}"' for t in WATCH_TOPICS))
        watch = ContainerdWatch(stream)
        self._watches.add(watch)
        return watch

    async def close(self) -> None:
        for watch in self._watches:
            await watch.aclose()
        self._watches.clear()
        if self._owns_client:
            await self.client.close()
