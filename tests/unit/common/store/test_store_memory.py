"""The in-memory fake store: its mutators, their events, and chunked reads."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import pytest

from services.common.store.memory import MemoryStore
from services.common.store.protocol import (
    ContentNotFoundError,
    ContentStore,
    Descriptor,
    EventKind,
    ImageRecord,
    StoreEvent,
)

WAIT_S = 30.0


async def collect(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([c async for c in chunks])


def test_is_a_content_store() -> None:
    assert isinstance(MemoryStore(), ContentStore)


async def test_blobs_by_digest_and_chunked_reads() -> None:
    store = MemoryStore(read_chunk=3)
    data = b"0123456789"
    digest = store.add_blob(data)
    assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert store.add_blob(data, "sha512") == "sha512:" + hashlib.sha512(data).hexdigest()
    assert await store.stat(digest) == 10
    chunks = [c async for c in store.read(digest, 1, 8)]
    assert chunks == [b"123", b"456", b"78"]
    assert await collect(store.read(digest, 20)) == b""
    with pytest.raises(ValueError):
        await collect(store.read(digest, -1))
    assert store.local_path(digest) is None
    with pytest.raises(ValueError):
        store.add_blob(data, "md5")


async def test_mutations_are_reported_in_order_to_every_watcher() -> None:
    store = MemoryStore()
    first, second = store.watch(), store.watch()
    digest = store.add_blob(b"x")
    target = Descriptor(digest, 1, "application/octet-stream")
    assert store.set_image("docker.io/a/b:1", target) is EventKind.IMAGE_CREATE
    assert store.set_image("docker.io/a/b:1", target) is None
    moved = Descriptor(store.add_blob(b"y"), 1, "application/octet-stream")
    assert store.set_image("docker.io/a/b:1", moved, {"k": "v"}) is EventKind.IMAGE_UPDATE
    assert await store.list_images() == [ImageRecord("docker.io/a/b:1", moved, {"k": "v"})]
    store.delete_image("docker.io/a/b:1")
    store.delete_blob(digest)
    expected = [
        StoreEvent(EventKind.IMAGE_CREATE, "docker.io/a/b:1"),
        StoreEvent(EventKind.IMAGE_UPDATE, "docker.io/a/b:1"),
        StoreEvent(EventKind.IMAGE_DELETE, "docker.io/a/b:1"),
        StoreEvent(EventKind.CONTENT_DELETE, digest),
    ]
    async with asyncio.timeout(WAIT_S):
        for watch in (first, second):
            assert [await anext(watch) for _ in expected] == expected
    with pytest.raises(ContentNotFoundError):
        store.delete_image("docker.io/a/b:1")
    with pytest.raises(ContentNotFoundError):
        store.delete_blob(digest)
    with pytest.raises(ContentNotFoundError):
        await store.resolve("docker.io/a/b:1")


async def test_close_ends_watchers() -> None:
    store = MemoryStore()
    watch = store.watch()
    pending = asyncio.ensure_future(anext(watch))
    await asyncio.sleep(0)  # one loop turn: the watcher waits for its first event (a yield)
    await store.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(pending, WAIT_S)
    # Nothing is queued for a closed watcher any more.
    store.add_blob(b"z")
    store.set_image("docker.io/a/b:2", Descriptor("sha256:" + "0" * 64, 1))
    with pytest.raises(StopAsyncIteration):
        await anext(watch)
