"""Per-node caps on upstream fetching: fetches in flight and bytes per second.

:class:`TokenBucket` is pure (time is passed in). :class:`FetchLimiter` wraps it and a slot count
for the client: a fetch waits at most `queue_wait` for a slot and for the bandwidth budget to
come within reach, else it is refused with :class:`UpstreamBusy`, which the caller answers with a
fast 404 so containerd goes upstream itself. Bytes already flowing are paced, never cut off.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from services.registry.upstream.errors import UpstreamBusy


class TokenBucket:
    """Bytes per second with a burst; a take may go into debt, paid back by waiting.

    Debt keeps large chunks exact: taking n bytes answers how long to wait before sending
    them, and later takes queue behind it.
    """

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be > 0")
        self.rate = rate
        self.burst = burst
        self._level = burst
        self._stamp = now

    def _refill(self, now: float) -> None:
        if now > self._stamp:
            self._level = min(self.burst, self._level + (now - self._stamp) * self.rate)
            self._stamp = now

    def delay(self, now: float) -> float:
        """Seconds until the bucket is out of debt (0 when bytes may flow now)."""
        self._refill(now)
        return 0.0 if self._level >= 0 else -self._level / self.rate

    def take(self, n: int, now: float) -> float:
        """Take `n` bytes; returns the seconds to wait before sending them."""
        self._refill(now)
        self._level -= n
        return 0.0 if self._level >= 0 else -self._level / self.rate


class FetchLimiter:
    """Slots for fetches in flight plus an optional bandwidth bucket, both per node."""

    def __init__(
        self,
        max_fetches: int,
        max_bandwidth: int,
        queue_wait: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_fetches <= 0:
            raise ValueError("max_fetches must be > 0")
        self.max_fetches = max_fetches
        self.queue_wait = queue_wait
        self._clock = clock
        self._slots = asyncio.Semaphore(max_fetches)
        self._in_flight = 0
        # One second of burst: short fetches (manifests) are not slowed by the cap at all.
        self.bucket = (
            TokenBucket(max_bandwidth, max_bandwidth, clock()) if max_bandwidth > 0 else None
        )

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def acquire(self) -> None:
        """Take a slot, waiting up to `queue_wait`; UpstreamBusy past it."""
        try:
            await asyncio.wait_for(self._slots.acquire(), self.queue_wait)
        except TimeoutError:
            raise UpstreamBusy(
                f"{self.max_fetches} upstream fetches in flight for {self.queue_wait:g} s"
            ) from None
        if self.bucket is not None:
            backlog = self.bucket.delay(self._clock())
            if backlog > self.queue_wait:
                self._slots.release()
                raise UpstreamBusy(
                    f"upstream bandwidth cap is {backlog:.1f} s behind "
                    f"(more than {self.queue_wait:g} s)"
                )
        self._in_flight += 1

    def release(self) -> None:
        self._in_flight -= 1
        self._slots.release()

    async def pace(self, n: int) -> None:
        """Wait until `n` more bytes fit under the bandwidth cap."""
        if self.bucket is None:
            return
        wait = self.bucket.take(n, self._clock())
        if wait > 0:
            await asyncio.sleep(wait)
