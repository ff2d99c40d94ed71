"""Content cache: bounded, disabled without a watch, invalidated by events, race-safe."""

from __future__ import annotations

from services.common.store.protocol import Descriptor, EventKind, StoreEvent
from services.registry.cache import BlobFacts, ContentCache, Lru, Manifest

D = Descriptor("sha256:" + "a" * 64, 10, "application/vnd.oci.image.manifest.v1+json")
M = Manifest(D.digest, b"{}", D.media_type)


def enabled() -> ContentCache:
    cache = ContentCache()
    cache.set_enabled(True)
    return cache


def test_lru_bounds_entries_and_weight() -> None:
    lru: Lru[str, int] = Lru(max_entries=3, max_weight=10)
    for i in range(5):
        lru.put(str(i), i, weight=1)
    assert len(lru) == 3 and lru.get("0") is None and lru.get("4") == 4
    lru.put("big", 0, weight=9)
    assert lru.weight <= 10
    lru.put("too-big", 0, weight=11)
    assert lru.get("too-big") is None


def test_disabled_cache_neither_stores_nor_answers() -> None:
    cache = ContentCache()
    cache.put_tag("k", D, cache.generation)
    assert cache.tag("k") is None
    cache.set_enabled(True)
    cache.put_tag("k", D, cache.generation)
    assert cache.tag("k") == D
    cache.set_enabled(False)
    assert cache.tag("k") is None


def test_stale_generation_is_not_cached() -> None:
    cache = enabled()
    generation = cache.generation
    cache.invalidate(StoreEvent(EventKind.IMAGE_UPDATE, "docker.io/x:1"))
    cache.put_tag("docker.io/x:1", D, generation)
    cache.put_manifest(M, generation)
    assert cache.tag("docker.io/x:1") is None and cache.manifest(D.digest) is None


def test_image_events_drop_tags_and_keep_content() -> None:
    cache = enabled()
    cache.put_tag("k", D, cache.generation)
    cache.put_manifest(M, cache.generation)
    cache.invalidate(StoreEvent(EventKind.IMAGE_CREATE, "other"))
    assert cache.tag("k") is None
    assert cache.manifest(D.digest) == M
    assert cache.blob(D.digest) == BlobFacts(2, True)


def test_content_delete_drops_that_digest() -> None:
    cache = enabled()
    cache.put_manifest(M, cache.generation)
    cache.put_blob("sha256:" + "b" * 64, BlobFacts(5, False), cache.generation)
    cache.invalidate(StoreEvent(EventKind.CONTENT_DELETE, D.digest))
    assert cache.manifest(D.digest) is None and cache.blob(D.digest) is None
    assert cache.blob("sha256:" + "b" * 64) == BlobFacts(5, False)
