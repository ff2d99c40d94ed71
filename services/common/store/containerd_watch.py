"""A containerd namespace's changes as store events, with the two things containerd leaves out.

containerd gives no sign of when a subscription is in force, so `ready()` publishes a probe on a
topic only this subscriber listens to and waits for it to come back. And containerd publishes
nothing when its garbage collector removes blobs after an image delete, so (when asked for) a
CONTENT_COLLECTED event follows each image delete once the collector had time to run.
"""

from __future__ import annotations

import asyncio
import secrets

from services.common.containerd.client import ContainerdClient
from services.common.containerd.errors import ContainerdError, ContainerdUnavailableError
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
from services.common.store.protocol import EventKind, StoreEvent

WATCH_TOPICS = (TOPIC_IMAGE_CREATE, TOPIC_IMAGE_UPDATE, TOPIC_IMAGE_DELETE, TOPIC_CONTENT_DELETE)
PROBE_TOPIC_PREFIX = "/peermirror/pinner-probe/"
PROBE_TYPE_URL = "peermirror.pinner.SubscriptionProbe"
# A probe not back within this is sent again; after PROBE_ATTEMPTS `ready()` goes on without
# the proof (a periodic full listing then bounds what could have been missed).
PROBE_WAIT_S = 0.25
PROBE_ATTEMPTS = 40
# containerd's collector runs after a delete once its pause budget allows (50x the last
# collection's duration by default): usually well under a second, but a collection of 0.2 s on
# a busy node holding many images puts the next one 10 s away. A report costs one content
# listing; a removal missed by all of them is caught by the watcher's periodic resync, minutes
# later.
COLLECTION_DELAYS_S = (0.5, 3.0, 10.0, 30.0, 90.0)

log = get_logger(__name__)


def store_event(envelope: Envelope) -> StoreEvent | None:
    """The store event for a containerd event, None for events the store does not report."""
    event = envelope.event
    if isinstance(event, ImageCreated):
        return StoreEvent(EventKind.IMAGE_CREATE, event.name)
    if isinstance(event, ImageUpdated):
        return StoreEvent(EventKind.IMAGE_UPDATE, event.name)
    if isinstance(event, ImageDeleted):
        return StoreEvent(EventKind.IMAGE_DELETE, event.name)
    if isinstance(event, ContentDeleted):
        return StoreEvent(EventKind.CONTENT_DELETE, event.digest)
    return None


class _Probe:
    """Queue item: our probe came back through the subscription."""


class _End:
    """Queue item: the watch was closed."""


_PROBE, _END = _Probe(), _End()
_Item = StoreEvent | _Probe | _End | BaseException


class ContainerdWatch:
    """Store events of `client`'s namespace; the subscription is requested at creation."""

    def __init__(self, client: ContainerdClient, *, report_collections: bool = False) -> None:
        self._client = client
        self._report_collections = report_collections
        self._probe_topic = PROBE_TOPIC_PREFIX + secrets.token_hex(8)
        filters = (f'topic=="{t}"' for t in (*WATCH_TOPICS, self._probe_topic))
        self._stream = client.subscribe(*filters)
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        # One pending report per delay: a burst of deletes is covered by the reports it finds.
        self._collections: dict[float, asyncio.TimerHandle] = {}
        self._closed = False
        self._reader = asyncio.create_task(self._pump(), name="containerd-watch")

    async def _pump(self) -> None:
        try:
            async for envelope in self._stream:
                if envelope.topic == self._probe_topic:
                    self._queue.put_nowait(_PROBE)
                    continue
                event = store_event(envelope)
                if event is None:
                    continue
                self._queue.put_nowait(event)
                if event.kind is EventKind.IMAGE_DELETE and self._report_collections:
                    self._schedule_collections()
        except Exception as exc:
            self._queue.put_nowait(exc)
        else:
            self._queue.put_nowait(
                _END if self._closed else ContainerdUnavailableError("event stream ended")
            )

    def _schedule_collections(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for delay in COLLECTION_DELAYS_S:
            pending = self._collections.get(delay)
            if pending is None or pending.when() <= now:
                self._collections[delay] = loop.call_later(
                    delay, self._queue.put_nowait, StoreEvent(EventKind.CONTENT_COLLECTED, "")
                )

    def __aiter__(self) -> ContainerdWatch:
        return self

    async def __anext__(self) -> StoreEvent:
        while True:
            if self._closed:
                raise StopAsyncIteration
            item = await self._queue.get()
            if isinstance(item, StoreEvent):
                return item
            if isinstance(item, BaseException):
                raise item
            if item is _END:
                raise StopAsyncIteration
            # A late probe answer: nothing changed.

    async def ready(self) -> bool:
        """Publish probes until one comes back through this subscription.

        Events received before it are dropped: they happened before the caller's listing.
        """
        for _attempt in range(PROBE_ATTEMPTS):
            try:
                await self._client.publish(self._probe_topic, PROBE_TYPE_URL)
            except ContainerdUnavailableError:
                raise
            except ContainerdError as exc:
                log.warning("cannot publish a subscription probe; going on", error=str(exc))
                return False
            try:
                async with asyncio.timeout(PROBE_WAIT_S):
                    while True:
                        item = await self._queue.get()
                        if isinstance(item, BaseException):
                            raise item
                        if item is _PROBE:
                            return True
                        if item is _END:
                            return False
            except TimeoutError:
                continue
        log.warning("subscription probe never came back; going on without proof")
        return False

    async def aclose(self) -> None:
        self._closed = True
        for timer in self._collections.values():
            timer.cancel()
        self._collections.clear()
        self._stream.close()
        self._queue.put_nowait(_END)
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
