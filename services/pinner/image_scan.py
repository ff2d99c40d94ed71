"""Reads an image's graph out of containerd: which digests each image reaches and holds.

Manifests are read from the content store's files when this process can see them (much faster
than the gRPC Read stream), else through containerd; their parsed children are cached by digest
(content is immutable). Presence is containerd's view of the namespace: one content listing for
a full sync, Info calls for a single image.
"""

from __future__ import annotations

import asyncio
from collections import ChainMap
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path

from services.common.containerd.client import ContainerdClient
from services.common.containerd.errors import ContainerdNotFoundError
from services.common.store.protocol import Descriptor
from services.pinner.tracker import digests_to_read, manifest_children, walk_image

# A manifest or index larger than this is not one (containerd itself caps manifests at 4 MiB).
MAX_MANIFEST_BYTES = 4 << 20
# Parallel Info calls for one image (a few dozen layers at most).
INFO_CONCURRENCY = 16


class _Everything(Collection[str]):
    """Treats every digest as present: used to learn an image's graph before asking about it."""

    def __contains__(self, item: object) -> bool:
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


class ImageScanner:
    """Works out the present digests of images in one containerd namespace."""

    def __init__(self, client: ContainerdClient, content_root: Path | None = None) -> None:
        self._client = client
        self._content_root = content_root
        self._children: dict[str, tuple[Descriptor, ...]] = {}

    @property
    def cached_manifests(self) -> int:
        return len(self._children)

    def set_content_root(self, root: Path | None) -> None:
        self._content_root = root

    async def present_digests(self) -> set[str]:
        """Every digest committed in the namespace (one listing call)."""
        return {info.digest for info in await self._client.list_content()}

    async def presence(self, digests: Iterable[str]) -> set[str]:
        """Which of `digests` are committed in the namespace (Info per digest)."""
        wanted = list(dict.fromkeys(digests))
        limit = asyncio.Semaphore(INFO_CONCURRENCY)

        async def check(digest: str) -> bool:
            async with limit:
                try:
                    await self._client.content_info(digest)
                except ContainerdNotFoundError:
                    return False
                return True

        answers = await asyncio.gather(*(check(d) for d in wanted))
        return {d for d, ok in zip(wanted, answers, strict=True) if ok}

    async def image_digests(
        self, target: Descriptor, present: Collection[str] | None = None
    ) -> frozenset[str]:
        """Digests reachable from `target` and present; `present` None asks containerd."""
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

    async def _read_manifest(self, digest: str) -> bytes | None:
        body = self._read_file(digest)
        if body is not None:
            return body
        chunks: list[bytes] = []
        total = 0
        try:
            async for chunk in self._client.read_content(digest):
                total += len(chunk)
                if total > MAX_MANIFEST_BYTES:
                    return b""
                chunks.append(chunk)
        except ContainerdNotFoundError:
            return None
        return b"".join(chunks)

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

    def prune(self, keep: Collection[str]) -> None:
        """Forget cached manifests not in `keep` (content that is gone)."""
        for digest in [d for d in self._children if d not in keep]:
            del self._children[digest]
