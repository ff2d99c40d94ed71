"""Follows the node's content store so its key set always matches its images, across restarts.

One session: open a watch, wait until it is in force (`StoreWatch.ready`), then list everything
(full sync) and apply events as they come; a full sync also runs every `resync_interval`.
Watching before listing means no change is lost between the two: whatever happened before the
watch was ready is in the listing, whatever happens after arrives as an event (applying an event
the listing already shows changes nothing, since every handler re-reads the store).

Losing the store (containerd restarting, a broken index.json) ends the session; the next one
starts after a short backoff, with a full sync. Nothing here ever ends the pinner.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import UTC, datetime

from services.common.logsetup import get_logger
from services.common.oci.document import split_digest
from services.common.store.protocol import (
    ContentNotFoundError,
    ContentStore,
    EventKind,
    StoreEvent,
    StoreWatch,
)
from services.pinner.image_graph import ImageGraph
from services.pinner.keys import KeyDelta, KeyIndex, KeyPolicy, image_key_set

KeySink = Callable[[KeyDelta], None]

BACKOFF_START_S = 0.1
BACKOFF_MAX_S = 2.0

log = get_logger(__name__)


class Tracker:
    """Keeps a `KeyIndex` of the store's mirrored images and reports every change to `sink`.

    Offers what the pinner runtime reads: `run`, `synced`, `resync`, `index` and the status
    fields (`connected`, `last_sync`, `last_error`).
    """

    def __init__(
        self,
        store: ContentStore,
        policy: KeyPolicy,
        sink: KeySink,
        *,
        resync_interval: float,
    ) -> None:
        self._store = store
        self._policy = policy
        self._sink = sink
        self._resync_interval = resync_interval
        self.graph = ImageGraph(store)
        self.index = KeyIndex()
        # Set once the first full sync has completed (the service reports SERVING then).
        self.synced = asyncio.Event()
        self.sessions = 0
        self.full_syncs = 0
        # Whether the last watch proved it was in force (see StoreWatch.ready).
        self.watch_proven = False
        # What the status API reports.
        self.connected = False
        self.last_sync: datetime | None = None
        self.last_error = ""
        # Full syncs (periodic or asked for) and event handling never interleave.
        self._lock = asyncio.Lock()

    # --- the session loop -------------------------------------------------------------------

    async def run(self) -> None:
        """Track until cancelled; store failures only ever start a new session."""
        backoff = BACKOFF_START_S
        failing = False
        while True:
            syncs_before = self.full_syncs
            try:
                await self._session()
            except Exception as exc:
                # Never let a lost store or a bug in one event take the pinner down: log it
                # once per outage and start over with a full sync.
                self.last_error = str(exc) or repr(exc)
                if not failing:
                    log.warning("store tracking failed; starting over", error=self.last_error)
                    failing = True
            if self.full_syncs > syncs_before:
                # The session worked for a while: start the backoff over.
                backoff = BACKOFF_START_S
                failing = False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _session(self) -> None:
        self.sessions += 1
        events = self._store.watch()
        try:
            self.watch_proven = await events.ready()
            await self.full_sync()
            if self.sessions > 1:
                log.info("store tracking resumed", sessions=self.sessions)
            await self._follow(events)
        finally:
            self.connected = False
            with contextlib.suppress(Exception):
                await events.aclose()

    async def _follow(self, events: StoreWatch) -> None:
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

    # --- syncing ----------------------------------------------------------------------------

    async def resync(self) -> KeyDelta:
        """Run a full sync now (the API's Resync), in turn with events."""
        return await self.full_sync()

    async def full_sync(self) -> KeyDelta:
        """List every image and all content; make the index match exactly."""
        async with self._lock:
            present = await self._store.digests()
            images = await self._store.list_images()
            desired: dict[str, frozenset[str]] = {}
            for image in images:
                if not self._policy.image_keys(image.name).digests:
                    continue
                digests = await self.graph.image_digests(image.target, present)
                keys = image_key_set(image.name, digests, self._policy)
                if keys:
                    desired[image.name] = keys
            self.graph.prune(present)
            delta = self.index.replace_all(desired)
        self.full_syncs += 1
        self.connected = True
        self.last_sync = datetime.now(UTC)
        self.last_error = ""
        self._emit(delta)
        if not self.synced.is_set():
            log.info(
                "first sync done",
                images=len(images),
                mirrored_images=len(desired),
                keys=len(self.index.keys),
            )
            self.synced.set()
        return delta

    async def refresh_image(self, name: str) -> KeyDelta:
        """Re-read image `name` from the store and update its keys (gone: removed)."""
        if not self._policy.image_keys(name).digests:
            return self.index.remove_image(name)
        try:
            target = await self._store.resolve(name)
        except ContentNotFoundError:
            return self.index.remove_image(name)
        digests = await self.graph.image_digests(target)
        return self.index.set_image(name, image_key_set(name, digests, self._policy))

    async def _apply(self, event: StoreEvent) -> KeyDelta:
        if event.kind is EventKind.CONTENT_DELETE:
            # The images holding that digest lose it (and what only it reached).
            self.graph.forget([event.subject])
            return await self._refresh_holders([event.subject])
        if event.kind is EventKind.CONTENT_COLLECTED:
            # Blobs went without an event each: compare what is held with what is there.
            held = [k for k in self.index.keys if split_digest(k) is not None]
            gone = set(held) - await self._store.digests()
            self.graph.forget(gone)
            return await self._refresh_holders(gone)
        return await self.refresh_image(event.subject)

    async def _refresh_holders(self, digests: set[str] | list[str]) -> KeyDelta:
        names: set[str] = set()
        for digest in digests:
            names |= self.index.holders_of(digest)
        delta = KeyDelta()
        for name in sorted(names):
            delta.merge(await self.refresh_image(name))
        return delta

    def _emit(self, delta: KeyDelta) -> None:
        if delta:
            log.debug("key set changed", added=len(delta.added), removed=len(delta.removed))
            self._sink(delta)
