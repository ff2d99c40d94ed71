"""Reading an event stream in tests, and proving a subscription is live before acting on it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")

# How long one probe is given to show up before another is sent. Not an assertion: a slow
# machine only sends more probes.
PROBE_INTERVAL_S = 0.25
# Upper bound for any single wait, so a broken stream fails the test instead of hanging it.
WAIT_S = 30.0


class EventPump(Generic[T]):
    """Drains an async iterator into a queue from a task of its own.

    Waiting for the next event can then be given up (timeouts) without cancelling the
    underlying stream. An error ending the stream is re-raised by `next()`.
    """

    def __init__(self, source: AsyncIterator[T]) -> None:
        self._source = source
        self._queue: asyncio.Queue[tuple[T | None, BaseException | None]] = asyncio.Queue()
        self._is_probe: Callable[[T], bool] | None = None
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            async for item in self._source:
                self._queue.put_nowait((item, None))
        except Exception as exc:
            self._queue.put_nowait((None, exc))
        else:
            self._queue.put_nowait((None, StopAsyncIteration()))

    async def _get(self, wait_s: float) -> T:
        item, error = await asyncio.wait_for(self._queue.get(), wait_s)
        if error is not None:
            raise error
        assert item is not None
        return item

    async def next(self, wait_s: float = WAIT_S) -> T:
        """The next event that is not a probe; raises TimeoutError after `wait_s` seconds."""
        async with asyncio.timeout(wait_s):
            while True:
                item = await self._get(wait_s)
                if self._is_probe is None or not self._is_probe(item):
                    return item

    async def take(self, count: int, wait_s: float = WAIT_S) -> list[T]:
        """The next `count` non-probe events."""
        return [await self.next(wait_s) for _ in range(count)]

    async def sync(
        self,
        probe: Callable[[int], Awaitable[object]],
        is_probe: Callable[[T], bool],
        wait_s: float = WAIT_S,
    ) -> None:
        """Return once the stream delivers events: call `probe(n)` until one of its events arrives.

        Everything received up to then is dropped, and probe events arriving later are skipped
        by `next()`, so afterwards the stream holds only what the test itself causes.
        """
        self._is_probe = is_probe
        async with asyncio.timeout(wait_s):
            attempt = 0
            while True:
                await probe(attempt)
                attempt += 1
                try:
                    while not is_probe(await self._get(PROBE_INTERVAL_S)):
                        pass
                    return
                except TimeoutError:
                    continue

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        aclose = getattr(self._source, "aclose", None)
        if aclose is not None:
            await aclose()
