"""Reads an image's graph out of a store: which digests each image reaches and holds.

`ManifestGraph` holds the walk shared by both trackers; `ImageScanner` supplies containerd's reads
(`store_tracker.StoreScanner` a ContentStore's).

Manifests are read from the content store's files when this process can see them (much faster
than the gRPC Read stream), else through containerd; their parsed children are cached by digest
(content is immutable). Presence is containerd's view of the namespace: one content listing for
a full sync, Info calls for a single image.
"""

from __future__ import annotations

import abc
import asyncio
from collections import ChainMap
from collections.abc import AsyncIterator, Collection, Iterable, Iterator
from pathlib import Path

from services.common.containerd.client import ContainerdClient
from services.common.containerd.errors import ContainerdNotFoundError
from services.common.store.protocol import Descriptor
from services.pinner.tracker import digests_to_read, manifest_children, walk_image

# A manifest or index larger than this is not one (containerd itself caps manifests at 4 MiB).
MAX_MANIFEST_BYTES = 4 << 20
# Parallel presence checks for one image (a few dozen layers at most).
CHECK_CONCURRENCY = 16


class _Everything(Collection[str]):
    """Treats every digest as present: used to learn an image's graph before asking about it."""

    def __contains__(self, item: object) -> bool:
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


async def read_capped(chunks: AsyncIterator[bytes]) -> bytes:
    """Join a manifest's chunks; b"" (parses as no children) when it outgrows a manifest."""
    parts: list[bytes] = []
    total = 0
    async for chunk in chunks:
        total += len(chunk)
        if total > MAX_MANIFEST_BYTES:
            return b""
        parts.append(chunk)
    return b"".join(parts)


class ManifestGraph(abc.ABC):
    """Which digests an image reaches and its store holds, with parsed manifests cached by
    digest (content is immutable). Subclasses supply the two store reads."""

    def __init__(self) -> None:
        self._children: dict[str, tuple[Descriptor, ...]] = {}

    @abc.abstractmethod
    async def _holds(self, digest: str) -> bool:
        """Whether the store holds `digest`."""

    @abc.abstractmethod
    async def _read_manifest(self, digest: str) -> bytes | None:
        """The body of `digest` (capped as read_capped does), or None when absent."""

    @property
    def cached_manifests(self) -> int:
        return len(self._children)

    async def presence(self, digests: Iterable[str]) -> set[str]:
        """Which of `digests` the store holds (one check per digest, a few at a time)."""
        wanted = list(dict.fromkeys(digests))
        limit = asyncio.Semaphore(CHECK_CONCURRENCY)

        async def check(digest: str) -> bool:
            async with limit:
                return await self._holds(digest)

        answers = await asyncio.gather(*(check(d) for d in wanted))
        return {d for d, ok in zip(wanted, answers, strict=True) if ok}

    async def image_digests(
        self, target: Descriptor, present: Collection[str] | None = None
    ) -> frozenset[str]:
        """Digests reachable from `target` and present; `present` None asks the store.

        Asking the store means: learn the graph as if everything were present (absent manifests
        read as childless), check those candidates, then walk the graph again with the answer.
        """
        if present is None:
            everything = _Everything()
            unreadable = await self._load(target, everything)
            known = ChainMap[str, tuple[Descriptor, ...]](self._children, unreadable)
            candidates = walk_image(target, lambda d: known.get(d.digest), everything)
            present = await self.presence(candidates)
        else:
            unreadable = await self._load(target, present)
            known = ChainMap(self._children, unreadable)
        return walk_image(target, lambda d: known.get(d.digest), present)

    async def _load(
        self, target: Descriptor, present: Collection[str]
    ) -> dict[str, tuple[Descriptor, ...]]:
        """Read every present manifest under `target` not cached yet; returns the unreadable
        ones (as childless, for this walk only: they may be complete later)."""
        unreadable: dict[str, tuple[Descriptor, ...]] = {}
        while True:
            known = ChainMap(self._children, unreadable)
            missing = digests_to_read(target, known, present)
            if not missing:
                return unreadable
            for desc in missing:
                body = await self._read_manifest(desc.digest)
                if body is None:
                    unreadable[desc.digest] = ()
                else:
                    self._children[desc.digest] = manifest_children(body, desc.media_type)

    def forget(self, digests: Iterable[str]) -> None:
        """Drop cached manifests that left the store."""
        for digest in digests:
            self._children.pop(digest, None)

    def prune(self, keep: Collection[str]) -> None:
        """Keep only the cached manifests in `keep` (content that is gone is forgotten)."""
        self.forget([d for d in self._children if d not in keep])


class ImageScanner(ManifestGraph):
    """The graph of images in one containerd namespace."""

    def __init__(self, client: ContainerdClient, content_root: Path | None = None) -> None:
        super().__init__()
        self._client = client
        self._content_root = content_root

    def set_content_root(self, root: Path | None) -> None:
        self._content_root = root

    async def present_digests(self) -> set[str]:
        """Every digest committed in the namespace (one listing call)."""
        return {info.digest for info in await self._client.list_content()}

    async def _holds(self, digest: str) -> bool:
        try:
            await self._client.content_info(digest)
        except ContainerdNotFoundError:
            return False
        return True

    async def _read_manifest(self, digest: str) -> bytes | None:
        body = self._read_file(digest)
        if body is not None:
            return body
        try:
            return await read_capped(self._client.read_content(digest))
        except ContainerdNotFoundError:
            return None

    def _read_file(self, digest: str) -> bytes | None:
        if self._content_root is None:
            return None
        algorithm, sep, encoded = digest.partition(":")
        if not sep or "/" in encoded or "/" in algorithm or not encoded:
            return None
        path = self._content_root / "blobs" / algorithm / encoded
        try:
            with path.open("rb") as f:
                body = f.read(MAX_MANIFEST_BYTES + 1)
        except OSError:
            return None
        # Too large for a manifest: no children (b"" parses as nothing).
        return b"" if len(body) > MAX_MANIFEST_BYTES else body
