"""Follows a ContentStore (the OCI-layout backend) so the node's key set matches its images.

The containerd tracker's counterpart for nodes without containerd: the same pure rules of
`tracker` (walk, keys per image, key index) over the store's Protocol instead of containerd's
API. One session: start watching (the store takes its first snapshot then), list everything
(full sync), apply the store's events; a full sync also runs every `resync_interval`. Watching
before listing means no change is lost between the two, and applying an event the listing
already shows changes nothing, since every handler re-reads the store.

The OCI layout reports blob deletions itself (CONTENT_DELETE), so unlike containerd no delayed
re-check after an image delete is needed. A failing store only ends the session; the next one
starts with a full sync. Nothing here ever ends the pinner.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from services.common.logsetup import get_logger
from services.common.store.protocol import (
    ContentStore,
    EventKind,
    NotFoundError,
    StoreEvent,
)
from services.pinner.image_scan import ManifestGraph, read_capped
from services.pinner.key_tracking import KeySink, KeyTracking
from services.pinner.tracker import KeyDelta, KeyPolicy, image_key_set

BACKOFF_START_S = 0.1
BACKOFF_MAX_S = 2.0


log = get_logger("pinner.store_tracker")


class StoreScanner(ManifestGraph):
    """The graph of a ContentStore's images (the store's reads, the shared graph logic)."""

    def __init__(self, store: ContentStore) -> None:
        super().__init__()
        self._store = store

    async def _holds(self, digest: str) -> bool:
        try:
            await self._store.stat(digest)
        except NotFoundError:
            return False
        return True

    async def _read_manifest(self, digest: str) -> bytes | None:
        try:
            return await read_capped(self._store.read(digest))
        except NotFoundError:
            return None


class StoreTracker(KeyTracking):
    """Keeps a `KeyIndex` of the store's mirrored images and reports every change to `sink`.

    Offers what the pinner runtime reads of a tracker: `run`, `synced`, `resync`, `index` and
    the status fields (`connected`, `last_sync`, `last_error`).
    """

    def __init__(
        self,
        store: ContentStore,
        policy: KeyPolicy,
        sink: KeySink,
        *,
        resync_interval: float,
    ) -> None:
        super().__init__(policy, sink, resync_interval=resync_interval)
        self._store = store
        self.scanner = StoreScanner(store)
        # Full syncs (periodic or asked for) and event handling never interleave.
        self._lock = asyncio.Lock()

    async def run(self) -> None:
        """Track until cancelled; store failures only ever start a new session."""
        backoff = BACKOFF_START_S
        while True:
            syncs_before = self.full_syncs
            try:
                await self._session()
            except Exception as exc:
                # A broken index.json, a vanished directory or a bug in one event: log and
                # start over with a full sync, never take the pinner down.
                self.connected = False
                self.last_error = repr(exc)
                log.exception("store tracking session failed; starting over")
            if self.full_syncs > syncs_before:
                backoff = BACKOFF_START_S
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _session(self) -> None:
        self.sessions += 1
        events = self._store.watch()
        try:
            await self.full_sync()
            await self._follow(events)
        finally:
            self.connected = False
            closer = getattr(events, "aclose", None)
            if closer is not None:
                with contextlib.suppress(Exception):
                    await closer()

    async def _follow(self, events: AsyncIterator[StoreEvent]) -> None:
        loop = asyncio.get_running_loop()
        next_resync = loop.time() + self._resync_interval
        while True:
            try:
                async with asyncio.timeout_at(next_resync):
                    event = await anext(events)
            except TimeoutError:
                await self.full_sync()
                next_resync = loop.time() + self._resync_interval
                continue
            except StopAsyncIteration:
                raise RuntimeError("the store's event stream ended") from None
            async with self._lock:
                delta = await self._apply(event)
            self._emit(delta)

    async def resync(self) -> KeyDelta:
        """Run a full sync now (the API's Resync)."""
        return await self.full_sync()

    async def full_sync(self) -> KeyDelta:
        """List every image; make the index match exactly what the store holds."""
        async with self._lock:
            images = await self._store.list_images()
            desired: dict[str, frozenset[str]] = {}
            reached: set[str] = set()
            for image in images:
                if not self._policy.image_keys(image.name).digests:
                    continue
                digests = await self.scanner.image_digests(image.target)
                reached |= digests
                keys = image_key_set(image.name, digests, self._policy)
                if keys:
                    desired[image.name] = keys
            self.scanner.prune(reached)
            delta = self.index.replace_all(desired)
        return self._full_sync_done(delta, images=len(images), mirrored=len(desired))

    async def refresh_image(self, name: str) -> KeyDelta:
        """Re-read image `name` from the store and update its keys (gone: removed)."""
        if not self._policy.image_keys(name).digests:
            return self.index.remove_image(name)
        try:
            target = await self._store.resolve(name)
        except NotFoundError:
            return self.index.remove_image(name)
        digests = await self.scanner.image_digests(target)
        return self.index.set_image(name, image_key_set(name, digests, self._policy))

    async def _apply(self, event: StoreEvent) -> KeyDelta:
        if event.kind in (EventKind.IMAGE_CREATE, EventKind.IMAGE_UPDATE, EventKind.IMAGE_DELETE):
            return await self.refresh_image(event.subject)
        # CONTENT_DELETE: the images holding that digest lose it (and what only it reached).
        self.scanner.forget([event.subject])
        delta = KeyDelta()
        for name in sorted(self.index.holders_of(event.subject)):
            delta.merge(await self.refresh_image(name))
        return delta
