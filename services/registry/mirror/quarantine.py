"""Peers caught serving wrong bytes, kept out of every relay for a while (pure, clock injected)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

DEFAULT_MAX_ENTRIES = 4096


class Quarantine(Generic[K]):
    """Keys added here are "in" for `duration` seconds; bounded, oldest expiry dropped first."""

    def __init__(
        self,
        duration: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        self.duration = duration
        self._clock = clock
        self._max_entries = max_entries
        # key -> expiry, kept in expiry order (every add uses the same duration).
        self._until: OrderedDict[K, float] = OrderedDict()

    def add(self, key: K) -> None:
        """Quarantine `key` from now on (an existing quarantine is extended)."""
        self._until.pop(key, None)
        self._until[key] = self._clock() + self.duration
        while len(self._until) > self._max_entries:
            self._until.popitem(last=False)

    def _expire(self, now: float) -> None:
        while self._until:
            key, until = next(iter(self._until.items()))
            if until > now:
                return
            del self._until[key]

    def __contains__(self, key: object) -> bool:
        self._expire(self._clock())
        return key in self._until

    def remaining(self, key: K) -> float:
        """Seconds `key` stays quarantined (0.0 when it is not)."""
        now = self._clock()
        self._expire(now)
        until = self._until.get(key)
        return 0.0 if until is None else until - now

    def __len__(self) -> int:
        self._expire(self._clock())
        return len(self._until)
