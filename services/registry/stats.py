"""The registry's request counters: a plain object the handlers bump and introspection reads."""

from __future__ import annotations

import enum
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from services.common.status.report import RECENT_WINDOW_S

# The "recent" of the recent hit rate: outcomes of this many seconds, at most RECENT_MAX kept.
RECENT_MAX = 10_000
# Manifest and blob requests kept for the status page's "recent pulls" (oldest dropped first).
RECENT_PULLS_MAX = 100


class RequestKind(enum.Enum):
    """What a request asked for (mirrors the introspection proto's RequestKind)."""

    MANIFEST = "manifest"
    BLOB = "blob"
    OTHER = "other"


class Result(enum.Enum):
    """How a request ended (mirrors the introspection proto's RequestResult)."""

    LOCAL_HIT = "local_hit"
    PEER_HIT = "peer_hit"
    NOT_FOUND = "not_found"
    REFUSED = "refused"
    CLIENT_ERROR = "client_error"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class CountKey:
    """One counter: requests of `kind` that ended with `result`, from a peer or not."""

    kind: RequestKind
    result: Result
    from_peer: bool


class RecentOutcomes:
    """Results of the last `window` seconds of requests (bounded; oldest dropped first)."""

    def __init__(
        self,
        window: float = RECENT_WINDOW_S,
        max_entries: int = RECENT_MAX,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self._clock = clock
        self._entries: deque[tuple[float, Result]] = deque(maxlen=max_entries)

    def add(self, result: Result) -> None:
        self._entries.append((self._clock(), result))

    def counts(self) -> Counter[Result]:
        """Results within the window, by result."""
        oldest = self._clock() - self.window
        while self._entries and self._entries[0][0] < oldest:
            self._entries.popleft()
        return Counter(result for _, result in self._entries)


@dataclass(frozen=True, slots=True)
class PullRecord:
    """One finished manifest or blob request, for the status page.

    `source` is where the content came from: "local" (this node's store) or the address of the
    peer registry it was relayed from; "" when nothing was served.
    """

    at: float  # Unix time the request finished
    ref: str
    kind: RequestKind
    result: Result
    from_peer: bool
    source: str
    bytes: int
    seconds: float


class RegistryStats:
    """Counters since start; single event loop, so plain integer updates need no locking."""

    def __init__(self) -> None:
        self.started_at = time.time()
        self.requests: Counter[CountKey] = Counter()
        # Manifest and blob requests of local clients (containerd), for the recent hit rate.
        self.recent = RecentOutcomes()
        self.pulls: deque[PullRecord] = deque(maxlen=RECENT_PULLS_MAX)
        self.bytes_served_local = 0
        self.bytes_relayed = 0
        self.in_flight = 0

    def begin(self) -> None:
        """A request started being answered."""
        self.in_flight += 1

    def end(self, kind: RequestKind, result: Result, from_peer: bool) -> None:
        """A request started with `begin` finished."""
        self.in_flight -= 1
        self.requests[CountKey(kind, result, from_peer)] += 1
        if kind is not RequestKind.OTHER and not from_peer:
            self.recent.add(result)

    def count(self, kind: RequestKind, result: Result, from_peer: bool = False) -> int:
        """Finished requests of one (kind, result, from_peer)."""
        return self.requests[CountKey(kind, result, from_peer)]

    def record_pull(self, record: PullRecord) -> None:
        """Keep one finished manifest or blob request among the recent ones."""
        self.pulls.append(record)
