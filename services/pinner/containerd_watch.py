"""Follows containerd so the node's key set always matches its images, across daemon restarts.

One session: subscribe to image and content events, prove the subscription is live (publish a
probe event only this subscriber listens for and wait for it), then list everything (full sync)
and apply events as they come; a full sync also runs every `resync_interval`. Subscribing
before listing means no change is lost between the two: whatever happened before the probe
came back is in the listing, whatever happens after arrives as an event (applying an event the
listing already shows changes nothing, since every event handler re-reads containerd's state).

containerd publishes nothing when its garbage collector removes blobs after an image delete, so
after `/images/delete` the digests other images still hold are checked again once the collector
had time to run. Losing containerd (restart, crash, socket gone) ends the session; the next one
starts once it answers again, with a full sync. Nothing here ever ends the pinner.
"""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

from services.common.containerd.client import ContainerdClient, EventStream
from services.common.containerd.errors import (
    ContainerdError,
    ContainerdNotFoundError,
    ContainerdUnavailableError,
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
from services.common.logsetup import get_logger
from services.common.oci.grammar import is_digest_syntax
from services.pinner.image_scan import ImageScanner
from services.pinner.key_tracking import KeySink, KeyTracking
from services.pinner.tracker import KeyDelta, KeyPolicy, image_key_set

TOPICS = (TOPIC_IMAGE_CREATE, TOPIC_IMAGE_UPDATE, TOPIC_IMAGE_DELETE, TOPIC_CONTENT_DELETE)
PROBE_TOPIC_PREFIX = "/peermirror/pinner-probe/"
PROBE_TYPE_URL = "peermirror.pinner.SubscriptionProbe"
# A probe not back within this is sent again; after PROBE_ATTEMPTS the session goes on without
# the proof (the periodic resync then bounds what could have been missed).
PROBE_WAIT_S = 0.25
PROBE_ATTEMPTS = 40
# containerd 1.6 schedules its collector right after a delete; checked twice to cover a busy
# daemon (a missed removal is caught by the periodic resync anyway).
GC_RECHECK_DELAYS_S = (0.5, 3.0)
BACKOFF_START_S = 0.1
BACKOFF_MAX_S = 2.0


log = get_logger("pinner.tracker")


class _Recheck:
    """Internal work item: digests whose presence must be checked again."""

    __slots__ = ("digests",)

    def __init__(self, digests: frozenset[str]) -> None:
        self.digests = digests


class _StreamEnded:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class _ResyncRequest:
    """Internal work item: a full sync asked for from outside (the gRPC API)."""

    __slots__ = ("done",)

    def __init__(self, done: asyncio.Future[KeyDelta]) -> None:
        self.done = done


_Item = Envelope | _Recheck | _StreamEnded | _ResyncRequest


class ContainerdTracker(KeyTracking):
    """Keeps a `KeyIndex` of the namespace's mirrored images and reports every change to `sink`."""

    def __init__(
        self,
        client: ContainerdClient,
        policy: KeyPolicy,
        sink: KeySink,
        *,
        resync_interval: float,
        content_root: Path | None = None,
    ) -> None:
        super().__init__(policy, sink, resync_interval=resync_interval)
        self._client = client
        self._content_root = content_root
        self.scanner = ImageScanner(client, content_root)
        self.probe_confirmed = False
        self._timers: list[asyncio.TimerHandle] = []
        self._queue: asyncio.Queue[_Item] | None = None

    # --- the session loop -------------------------------------------------------------------

    async def run(self) -> None:
        """Track until cancelled; containerd failures only ever start a new session."""
        backoff = BACKOFF_START_S
        down_logged = False
        while True:
            syncs_before = self.full_syncs
            try:
                if self.sessions:
                    await self._client.wait_connected()
                if down_logged:
                    log.info("containerd is back; resyncing", address=self._client.address)
                    down_logged = False
                await self._session()
            except ContainerdUnavailableError as exc:
                self.connected = False
                self.last_error = str(exc)
                if not down_logged:
                    log.warning(
                        "containerd unavailable; reconnecting",
                        address=self._client.address,
                        error=str(exc),
                    )
                    down_logged = True
            except ContainerdError as exc:
                self.last_error = str(exc)
                log.error("containerd call failed; starting over", error=str(exc))
            except Exception as exc:
                # Never let a bug in one event take the pinner down: log it, start over.
                self.last_error = repr(exc)
                log.exception("tracker session failed; starting over")
            if self.full_syncs > syncs_before:
                # The session worked for a while: start the backoff over.
                backoff = BACKOFF_START_S
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _session(self) -> None:
        self.sessions += 1
        if self._content_root is None:
            try:
                self.scanner.set_content_root(await self._client.content_root())
            except ContainerdUnavailableError:
                raise
            except ContainerdError as exc:
                log.info(
                    "content root unknown; reading manifests through containerd", error=str(exc)
                )
        probe_topic = PROBE_TOPIC_PREFIX + secrets.token_hex(8)
        stream = self._client.subscribe(*(f'topic=="{t}"' for t in (*TOPICS, probe_topic)))
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._queue = queue
        reader = asyncio.create_task(self._pump(stream, queue))
        try:
            await self._await_live(queue, probe_topic)
            await self.full_sync()
            loop = asyncio.get_running_loop()
            next_resync = loop.time() + self._resync_interval
            while True:
                try:
                    async with asyncio.timeout_at(next_resync):
                        item = await queue.get()
                except TimeoutError:
                    await self.full_sync()
                    next_resync = loop.time() + self._resync_interval
                    continue
                await self._handle(item)
        finally:
            self._queue = None
            self.connected = False
            while not queue.empty():
                item = queue.get_nowait()
                if isinstance(item, _ResyncRequest) and not item.done.done():
                    item.done.set_exception(ContainerdUnavailableError("containerd session ended"))
            for timer in self._timers:
                timer.cancel()
            self._timers.clear()
            stream.close()
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    @staticmethod
    async def _pump(stream: EventStream, queue: asyncio.Queue[_Item]) -> None:
        try:
            async for envelope in stream:
                queue.put_nowait(envelope)
        except Exception as exc:
            queue.put_nowait(_StreamEnded(exc))
        else:
            queue.put_nowait(_StreamEnded(ContainerdUnavailableError("event stream ended")))

    async def _await_live(self, queue: asyncio.Queue[_Item], probe_topic: str) -> None:
        """Publish probes until one comes back through our subscription.

        Events received before it are dropped: they happened before the listing that follows.
        """
        self.probe_confirmed = False
        for _attempt in range(PROBE_ATTEMPTS):
            try:
                await self._client.publish(probe_topic, PROBE_TYPE_URL)
            except ContainerdUnavailableError:
                raise
            except ContainerdError as exc:
                log.warning("cannot publish a subscription probe; going on", error=str(exc))
                return
            loop = asyncio.get_running_loop()
            deadline = loop.time() + PROBE_WAIT_S
            try:
                async with asyncio.timeout_at(deadline):
                    while True:
                        item = await queue.get()
                        if isinstance(item, _StreamEnded):
                            raise item.error
                        if isinstance(item, Envelope) and item.topic == probe_topic:
                            self.probe_confirmed = True
                            return
            except TimeoutError:
                continue
        log.warning("subscription probe never came back; going on without proof")

    # --- syncing ----------------------------------------------------------------------------

    async def resync(self) -> KeyDelta:
        """Run a full sync now, in turn with events; ContainerdUnavailableError when down."""
        if self._queue is None:
            raise ContainerdUnavailableError("containerd is not connected")
        done: asyncio.Future[KeyDelta] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_ResyncRequest(done))
        return await done

    async def full_sync(self) -> KeyDelta:
        """List every image and all content; make the index match exactly."""
        present = await self.scanner.present_digests()
        images = await self._client.list_images()
        desired: dict[str, frozenset[str]] = {}
        for image in images:
            if not self._policy.image_keys(image.name).digests:
                continue
            digests = await self.scanner.image_digests(image.target, present)
            keys = image_key_set(image.name, digests, self._policy)
            if keys:
                desired[image.name] = keys
        self.scanner.prune(present)
        delta = self.index.replace_all(desired)
        return self._full_sync_done(delta, images=len(images), mirrored=len(desired))

    async def refresh_image(self, name: str) -> KeyDelta:
        """Re-read image `name` from containerd and update its keys (gone: removed)."""
        if not self._policy.image_keys(name).digests:
            return self.index.remove_image(name)
        try:
            image = await self._client.get_image(name)
        except ContainerdNotFoundError:
            return self.index.remove_image(name)
        digests = await self.scanner.image_digests(image.target)
        return self.index.set_image(name, image_key_set(name, digests, self._policy))

    async def _handle(self, item: _Item) -> None:
        if isinstance(item, _StreamEnded):
            raise item.error
        if isinstance(item, _Recheck):
            await self._recheck(item.digests)
            return
        if isinstance(item, _ResyncRequest):
            try:
                delta = await self.full_sync()
            except Exception as exc:
                if not item.done.done():
                    item.done.set_exception(exc)
                raise
            if not item.done.done():
                item.done.set_result(delta)
            return
        event = item.event
        delta = KeyDelta()
        if isinstance(event, ImageCreated | ImageUpdated):
            delta = await self.refresh_image(event.name)
        elif isinstance(event, ImageDeleted):
            held = self.index.image(event.name)
            delta = self.index.remove_image(event.name)
            self._schedule_recheck(frozenset(held) - delta.removed)
        elif isinstance(event, ContentDeleted):
            for name in sorted(self.index.holders_of(event.digest)):
                delta.merge(await self.refresh_image(name))
        self._emit(delta)

    def _schedule_recheck(self, keys: frozenset[str]) -> None:
        digests = frozenset(k for k in keys if is_digest_syntax(k))
        if not digests:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        # Fired timers are dropped so the list stays short.
        self._timers = [t for t in self._timers if t.when() > now]
        for delay in GC_RECHECK_DELAYS_S:
            self._timers.append(loop.call_later(delay, self._enqueue_recheck, digests))

    def _enqueue_recheck(self, digests: frozenset[str]) -> None:
        if self._queue is not None:
            self._queue.put_nowait(_Recheck(digests))

    async def _recheck(self, digests: frozenset[str]) -> None:
        held = {d for d in digests if self.index.holders_of(d)}
        if not held:
            return
        gone = held - await self.scanner.presence(held)
        delta = KeyDelta()
        names: set[str] = set()
        for digest in gone:
            names |= self.index.holders_of(digest)
        for name in sorted(names):
            delta.merge(await self.refresh_image(name))
        self._emit(delta)
