"""Logs a refused-for-limits event once per client and interval, so abuse cannot flood the log."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from services.common.logsetup import get_logger

# A client hammering a limit is named again after this many seconds (with how often it was hit).
DEFAULT_INTERVAL = 60.0
# Clients remembered at most; the oldest is forgotten first, so memory stays bounded under a
# flood of distinct source addresses.
DEFAULT_CAPACITY = 4096


class RateLimiter:
    """Decides, per key (e.g. "limit:client"), whether an event is logged now (pure: no I/O)."""

    def __init__(
        self, interval: float = DEFAULT_INTERVAL, capacity: int = DEFAULT_CAPACITY
    ) -> None:
        self.interval = interval
        self.capacity = capacity
        # key -> (time of the last logged event, events suppressed since)
        self._seen: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def check(self, key: str, now: float) -> int | None:
        """None to stay quiet; otherwise the number of events suppressed since the last one
        logged for `key` (0 the first time)."""
        last = self._seen.get(key)
        if last is not None and now - last[0] < self.interval:
            self._seen[key] = (last[0], last[1] + 1)
            return None
        self._seen[key] = (now, 0)
        self._seen.move_to_end(key)
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
        return 0 if last is None else last[1]

    def __len__(self) -> int:
        return len(self._seen)


class LimitLog:
    """Warns that `client` hit `limit`, at most once per interval per (limit, client)."""

    def __init__(
        self,
        logger_name: str,
        limiter: RateLimiter | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = get_logger(logger_name)
        self._limiter = limiter if limiter is not None else RateLimiter()
        self._clock = clock

    def refused(self, limit: str, client: str, message: str, **fields: Any) -> bool:
        """Log the refusal unless this client was already named for this limit recently;
        True when a line was written."""
        suppressed = self._limiter.check(f"{limit}\x00{client}", self._clock())
        if suppressed is None:
            return False
        self._log.warning(message, limit=limit, client=client, suppressed=suppressed, **fields)
        return True
