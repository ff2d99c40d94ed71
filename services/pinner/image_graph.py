"""Which digests an image reaches and its content store holds.

An image record names a target (index or manifest). Walking it gives the digests it reaches —
index, manifests, configs, layers — of which only those present in the store count. The walks
are pure (`walk_image`, `digests_to_read`); `ImageGraph` reads manifests from a ContentStore
and caches their parsed children by digest (content is immutable).
"""

from __future__ import annotations

import asyncio
from collections import ChainMap
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Iterator, Mapping

from services.common.oci.document import MAX_MANIFEST_BYTES, manifest_children, reachable
from services.common.store.protocol import ContentNotFoundError, ContentStore, Descriptor

# Indexes may nest (an index of indexes); real images go two levels deep. The bound only stops
# a malicious or corrupt chain from recursing for ever.
MAX_DEPTH = 8
# Parallel presence checks for one image (a few dozen layers at most).
CHECK_CONCURRENCY = 16


def walk_image(
    target: Descriptor,
    children: Callable[[Descriptor], tuple[Descriptor, ...] | None],
    present: Collection[str],
) -> frozenset[str]:
    """Every digest reachable from `target` that is in `present`, at most MAX_DEPTH levels
    down (see `document.reachable`: an absent manifest hides its children)."""
    return reachable([target], children, present, max_depth=MAX_DEPTH)


def digests_to_read(
    target: Descriptor,
    known: Mapping[str, tuple[Descriptor, ...]],
    present: Collection[str],
) -> list[Descriptor]:
    """The present manifests reachable from `target` whose children are not in `known` yet.

    Walks as far as `known` allows; the caller reads what is returned, adds it to `known` and
    asks again until nothing is left (each round goes one level deeper).
    """
    missing: dict[str, Descriptor] = {}

    def children(desc: Descriptor) -> tuple[Descriptor, ...] | None:
        kids = known.get(desc.digest)
        if kids is None:
            missing.setdefault(desc.digest, desc)
        return kids

    walk_image(target, children, present)
    return list(missing.values())


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


class ImageGraph:
    """The graph of a ContentStore's images, with parsed manifests cached by digest."""

    def __init__(self, store: ContentStore) -> None:
        self._store = store
        self._children: dict[str, tuple[Descriptor, ...]] = {}

    @property
    def cached_manifests(self) -> int:
        return len(self._children)

    async def presence(self, digests: Iterable[str]) -> set[str]:
        """Which of `digests` the store holds (one check per digest, a few at a time)."""
        wanted = list(dict.fromkeys(digests))
        limit = asyncio.Semaphore(CHECK_CONCURRENCY)

        async def check(digest: str) -> bool:
            async with limit:
                try:
                    await self._store.stat(digest)
                except ContentNotFoundError:
                    return False
                return True

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
                try:
                    body = await read_capped(self._store.read(desc.digest))
                except ContentNotFoundError:
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
