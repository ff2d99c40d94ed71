"""When a node with peers pings configured bootstrap addresses missing from its routing table.

Bootstrapping only when the table is empty leaves a restarted bootstrap node (which has no
bootstrap source of its own and comes back knowing nobody) cut off for good once the others
dropped it. So every configured address that is not among our contacts is pinged again, each
with its own backoff, a bounded number per round. Pure: the engine does the pings.
"""

from __future__ import annotations

import random
from collections.abc import Container, Iterable
from dataclasses import dataclass

from services.discovery.bootstrap import BootstrapEndpoint

# Most addresses pinged per round: a peer list naming every node of a large cluster (most
# of them rightly absent from a k-bucket table) must not turn into a ping storm.
REJOIN_BATCH = 8
# Longest wait between pings of a silent address: a node down for long is found again
# within about a minute of its return.
REJOIN_CAP = 60.0


@dataclass
class _Retry:
    failures: int = 0
    next_at: float = 0.0
    in_flight: bool = False


class RejoinSchedule:
    """Per configured endpoint: who answered there, and when to ping it next while absent.

    Rounds run every `base` seconds (with jitter), and each pings at most `batch` endpoints.
    An endpoint is present when a contact in the table has that address and port, or when
    the node that last answered there is in the table (one node may be listed under another
    of its addresses). An absent endpoint is pinged in the first round that sees it absent,
    then after `base` * 2^failures (capped at `cap`, with jitter) while it stays silent; one
    that answers as a node the table does not take (its bucket is full) is asked again only
    after `recheck`. An endpoint that answered as this node is never pinged again.
    """

    def __init__(
        self,
        *,
        base: float,
        cap: float,
        recheck: float,
        batch: int = REJOIN_BATCH,
        rng: random.Random | None = None,
    ) -> None:
        if base <= 0 or cap < base or recheck < base or batch < 1:
            raise ValueError("need 0 < base <= cap, base <= recheck and batch >= 1")
        self.base = base
        self.cap = cap
        self.recheck = recheck
        self.batch = batch
        self._rng = rng or random.Random()
        self._answered: dict[BootstrapEndpoint, bytes] = {}
        self._retry: dict[BootstrapEndpoint, _Retry] = {}
        # Our own address as a source lists it (a peer list or DNS name naming every node).
        self._own: set[BootstrapEndpoint] = set()
        self._next_round = 0.0

    def due(
        self,
        endpoints: Iterable[BootstrapEndpoint],
        table_ids: Container[bytes],
        table_endpoints: Container[BootstrapEndpoint],
        now: float,
    ) -> list[BootstrapEndpoint]:
        """The absent endpoints to ping now (most overdue first, at most `batch`); each is
        reported back with `answered` or `failed`. Endpoints no longer listed are forgotten.
        Empty until the next round is due."""
        if now < self._next_round:
            return []
        self._next_round = now + self._jitter(self.base)
        listed = set(endpoints)
        for gone in [e for e in self._retry if e not in listed]:
            del self._retry[gone]
        for gone in [e for e in self._answered if e not in listed]:
            del self._answered[gone]
        ready: list[tuple[float, BootstrapEndpoint]] = []
        for endpoint in sorted(listed):
            if endpoint in self._own:
                continue
            answered = self._answered.get(endpoint)
            if endpoint in table_endpoints or (answered is not None and answered in table_ids):
                self._retry.pop(endpoint, None)
                continue
            retry = self._retry.get(endpoint)
            if retry is None:
                retry = self._retry[endpoint] = _Retry(next_at=now)
            if not retry.in_flight and now >= retry.next_at:
                ready.append((retry.next_at, endpoint))
        ready.sort()
        chosen = [endpoint for _at, endpoint in ready[: self.batch]]
        for endpoint in chosen:
            self._retry[endpoint].in_flight = True
        return chosen

    def answered(
        self, endpoint: BootstrapEndpoint, node_id: bytes, own_id: bytes, now: float
    ) -> None:
        """`node_id` answered a ping at `endpoint`."""
        if node_id == own_id:
            self._own.add(endpoint)
            self._retry.pop(endpoint, None)
            return
        self._answered[endpoint] = node_id
        retry = self._retry.get(endpoint)
        if retry is not None:
            # Present from the next round on when the table took it; otherwise not worth
            # asking again soon.
            retry.failures = 0
            retry.in_flight = False
            retry.next_at = now + self._jitter(self.recheck)

    def failed(self, endpoint: BootstrapEndpoint, now: float) -> int:
        """A ping at `endpoint` got no usable answer; returns the failures in a row."""
        retry = self._retry.setdefault(endpoint, _Retry())
        retry.failures += 1
        retry.in_flight = False
        delay = min(self.cap, self.base * 2.0 ** min(retry.failures, 16))
        retry.next_at = now + min(self.cap, self._jitter(delay))
        return retry.failures

    def failures(self, endpoint: BootstrapEndpoint) -> int:
        """Failed pings in a row at `endpoint` (0 when it answered last or is present)."""
        retry = self._retry.get(endpoint)
        return 0 if retry is None else retry.failures

    def _jitter(self, delay: float) -> float:
        # Nodes restarting together must not ping in lockstep.
        return delay * self._rng.uniform(0.8, 1.2)
