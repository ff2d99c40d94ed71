"""The registry's request counters: a plain object the handlers bump and introspection reads."""

from __future__ import annotations

import enum
import time
from collections import Counter
from dataclasses import dataclass


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


class RegistryStats:
    """Counters since start; single event loop, so plain integer updates need no locking."""

    def __init__(self) -> None:
        self.started_at = time.time()
        self.requests: Counter[CountKey] = Counter()
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

    def count(self, kind: RequestKind, result: Result, from_peer: bool = False) -> int:
        """Finished requests of one (kind, result, from_peer)."""
        return self.requests[CountKey(kind, result, from_peer)]
