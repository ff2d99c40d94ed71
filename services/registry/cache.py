"""Bounded caches of tag resolutions, manifest bodies and blob facts, emptied by store events.

Why it is safe: manifests and blob facts are keyed by digest, so they only go stale when the
content is deleted (CONTENT_DELETE); tag resolutions go stale on any image event. The cache is
only used while a store watch is live (`enabled`); whenever the watch is lost everything is
dropped and lookups go to the store until a new watch is in force.

Every store lookup takes `generation` before awaiting and hands it back with the result; a result
whose generation is no longer current (an invalidation happened meanwhile) is not cached, so a
slow lookup can never put back what an event just removed.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

from services.common.store.protocol import Descriptor, EventKind, StoreEvent

K = TypeVar("K")
V = TypeVar("V")

DEFAULT_MAX_TAGS = 4096
DEFAULT_MAX_BLOBS = 16384
DEFAULT_MAX_MANIFEST_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Manifest:
    """A manifest or index as served: its bytes, digest and media type."""

    digest: str
    body: bytes
    media_type: str

    @property
    def size(self) -> int:
        return len(self.body)


@dataclass(frozen=True, slots=True)
class BlobFacts:
    """What is known about content by digest: its size and whether it is a manifest/index."""

    size: int
    is_manifest: bool


class Lru(Generic[K, V]):
    """A least-recently-used map bounded by entry count and by a total weight."""

    def __init__(self, max_entries: int, max_weight: int | None = None) -> None:
        self.max_entries = max_entries
        self.max_weight = max_weight
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self.weight = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: K) -> V | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: K, value: V, weight: int = 0) -> None:
        if self.max_weight is not None and weight > self.max_weight:
            return
        self.pop(key)
        self._items[key] = (value, weight)
        self.weight += weight
        while len(self._items) > self.max_entries or (
            self.max_weight is not None and self.weight > self.max_weight
        ):
            _, (_, dropped) = self._items.popitem(last=False)
            self.weight -= dropped

    def pop(self, key: K) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self.weight -= item[1]

    def clear(self) -> None:
        self._items.clear()
        self.weight = 0


class ContentCache:
    """The registry's caches (see the module docstring); single event loop, no locking."""

    def __init__(
        self,
        *,
        max_tags: int = DEFAULT_MAX_TAGS,
        max_blobs: int = DEFAULT_MAX_BLOBS,
        max_manifest_bytes: int = DEFAULT_MAX_MANIFEST_BYTES,
    ) -> None:
        self.tags: Lru[str, Descriptor] = Lru(max_tags)
        self.manifests: Lru[str, Manifest] = Lru(max_blobs, max_manifest_bytes)
        self.blobs: Lru[str, BlobFacts] = Lru(max_blobs)
        self.enabled = False
        self.generation = 0

    # --- lookups (None when disabled or absent) ----------------------------------------------

    def tag(self, key: str) -> Descriptor | None:
        return self.tags.get(key) if self.enabled else None

    def manifest(self, digest: str) -> Manifest | None:
        return self.manifests.get(digest) if self.enabled else None

    def blob(self, digest: str) -> BlobFacts | None:
        return self.blobs.get(digest) if self.enabled else None

    # --- filling (ignored when disabled or when `generation` is stale) ------------------------

    def _fresh(self, generation: int) -> bool:
        return self.enabled and generation == self.generation

    def put_tag(self, key: str, target: Descriptor, generation: int) -> None:
        if self._fresh(generation):
            self.tags.put(key, target)

    def put_manifest(self, manifest: Manifest, generation: int) -> None:
        if self._fresh(generation):
            self.manifests.put(manifest.digest, manifest, manifest.size)
            self.blobs.put(manifest.digest, BlobFacts(manifest.size, True))

    def put_blob(self, digest: str, facts: BlobFacts, generation: int) -> None:
        if self._fresh(generation):
            self.blobs.put(digest, facts)

    # --- invalidation ---------------------------------------------------------------------------

    def invalidate(self, event: StoreEvent) -> None:
        """Drop what `event` may have made stale."""
        self.generation += 1
        # Image events are rare and a tag key may be spelled in several ways by the store, so
        # every tag resolution goes; content-addressed entries stay valid.
        self.tags.clear()
        if event.kind is EventKind.CONTENT_DELETE:
            self.manifests.pop(event.subject)
            self.blobs.pop(event.subject)

    def clear(self) -> None:
        """Drop everything (the watch was lost, or a new one begins)."""
        self.generation += 1
        self.tags.clear()
        self.manifests.clear()
        self.blobs.clear()

    def set_enabled(self, enabled: bool) -> None:
        """Turn caching on (after a watch is in force) or off (clearing everything)."""
        self.clear()
        self.enabled = enabled
