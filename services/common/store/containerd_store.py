"""The content store backed by a node's containerd: its images, its blobs, its change events."""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path

from services.common.containerd.client import (
    DEFAULT_ADDRESS,
    DEFAULT_NAMESPACE,
    ContainerdClient,
)
from services.common.containerd.errors import ContainerdError, ContainerdUnavailableError
from services.common.logsetup import get_logger
from services.common.oci.document import blob_path, split_digest
from services.common.store.containerd_watch import ContainerdWatch
from services.common.store.file_range import read_range
from services.common.store.protocol import (
    ContentNotFoundError,
    Descriptor,
    ImageRecord,
    store_failures,
)

READ_CHUNK_BYTES = 1 << 20

log = get_logger(__name__)


def read_window(size: int, offset: int, length: int | None) -> tuple[int, int]:
    """The `[start, end)` byte window of a read of `length` from `offset` in a blob of `size`.

    A window past the end is empty; negative offsets or lengths are refused.
    """
    if offset < 0 or (length is not None and length < 0):
        raise ValueError(f"invalid read window: offset={offset} length={length}")
    end = size if length is None else min(size, offset + length)
    start = min(offset, size)
    return start, max(start, end)


class ContainerdStore:
    """ContentStore over containerd's gRPC API, reading blob files directly when it can.

    Blob files under the content root are shared by all namespaces, so every read first asks
    containerd whether this namespace holds the digest (one Info call) and only then opens the
    file. `local_path()` cannot ask (it is synchronous): callers `stat()` first, as the registry
    does for Content-Length anyway.

    `find_root` asks containerd for its content root at the first read when none was given;
    `report_collections` makes watches report CONTENT_COLLECTED after image deletes.
    """

    def __init__(
        self,
        client: ContainerdClient,
        content_root: Path | None = None,
        *,
        owns_client: bool = False,
        find_root: bool = False,
        report_collections: bool = False,
    ) -> None:
        self.client = client
        self.content_root = content_root
        self._owns_client = owns_client
        self._find_root = find_root and content_root is None
        self._report_collections = report_collections
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
        with store_failures(ContainerdError):
            return (await self.client.get_image(reference)).target

    async def stat(self, digest: str) -> int:
        if split_digest(digest) is None:
            raise ContentNotFoundError(digest)
        with store_failures(ContainerdError):
            return (await self.client.content_info(digest)).size

    async def read(
        self, digest: str, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        with store_failures(ContainerdError, OSError):
            size = await self.stat(digest)
            start, end = read_window(size, offset, length)
            if start == end:
                return
            if self._find_root:
                await self._look_up_root()
            path = self.local_path(digest)
            if path is not None:
                try:
                    fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
                except FileNotFoundError:
                    pass
                else:
                    # containerd never truncates a committed blob: a short file was removed.
                    gone = functools.partial(ContentNotFoundError, digest)
                    async with aclosing(
                        read_range(fd, start, end, READ_CHUNK_BYTES, gone)
                    ) as chunks:
                        async for chunk in chunks:
                            yield chunk
                    return
            async for chunk in self.client.read_content(digest, start, end - start):
                yield chunk

    async def _look_up_root(self) -> None:
        try:
            self.content_root = await self.client.content_root()
        except ContainerdUnavailableError:
            raise
        except ContainerdError as exc:
            log.info("content root unknown; reading through containerd", error=str(exc))
        self._find_root = False

    def local_path(self, digest: str) -> Path | None:
        # Only well-formed digests become paths, so no input can point outside the store.
        path = None if self.content_root is None else blob_path(self.content_root, digest)
        return path if path is not None and path.is_file() else None

    async def list_images(self) -> list[ImageRecord]:
        return [
            ImageRecord(name=image.name, target=image.target, labels=image.labels)
            for image in await self.client.list_images()
        ]

    async def digests(self) -> set[str]:
        return {info.digest for info in await self.client.list_content()}

    def watch(self) -> ContainerdWatch:
        """Image and content-delete events of this namespace (the subscription starts here;
        `ready()` proves it is in force)."""
        watch = ContainerdWatch(self.client, report_collections=self._report_collections)
        self._watches.add(watch)
        return watch

    async def close(self) -> None:
        for watch in self._watches:
            await watch.aclose()
        self._watches.clear()
        if self._owns_client:
            await self.client.close()
