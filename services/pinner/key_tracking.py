"""What the containerd and the content-store trackers share: the key index, the sink told of
every change, and the status the Pinner API reports (connected, last sync, last error)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime

from services.common.logsetup import get_logger
from services.pinner.tracker import KeyDelta, KeyIndex, KeyPolicy

KeySink = Callable[[KeyDelta], None]

log = get_logger("pinner.tracker")


class KeyTracking:
    """Base of both trackers; subclasses list their store and call `_full_sync_done`."""

    def __init__(self, policy: KeyPolicy, sink: KeySink, *, resync_interval: float) -> None:
        self._policy = policy
        self._sink = sink
        self._resync_interval = resync_interval
        self.index = KeyIndex()
        # Set once the first full sync has completed (the service reports SERVING then).
        self.synced = asyncio.Event()
        self.sessions = 0
        self.full_syncs = 0
        # What the status API reports.
        self.connected = False
        self.last_sync: datetime | None = None
        self.last_error = ""

    def _full_sync_done(self, delta: KeyDelta, *, images: int, mirrored: int) -> KeyDelta:
        """Record a completed full sync, report its changes, and mark the first one."""
        self.full_syncs += 1
        self.connected = True
        self.last_sync = datetime.now(UTC)
        self.last_error = ""
        self._emit(delta)
        if not self.synced.is_set():
            log.info(
                "first sync done",
                images=images,
                mirrored_images=mirrored,
                keys=len(self.index.keys),
            )
            self.synced.set()
        return delta

    def _emit(self, delta: KeyDelta) -> None:
        if delta:
            log.debug("key set changed", added=len(delta.added), removed=len(delta.removed))
            self._sink(delta)
