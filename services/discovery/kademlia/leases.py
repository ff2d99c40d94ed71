"""Fetch leases a node grants as the authority for keys it is closest to, and who that is.

A lease says "node H is fetching the content named by this key from upstream; ask it, not
the upstream". The node closest to the key (by XOR distance, among the nodes that answer)
keeps the lease; every node asks it. Pure state and rules, no I/O: the clock is passed in.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from services.common.errors import (
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
)
from services.discovery.kademlia.contact import Contact
from services.discovery.kademlia.expiring import Expiring
from services.discovery.kademlia.node_id import check_id, xor_distance


@dataclass(frozen=True, slots=True)
class FetchLease(Expiring):
    """`holder` fetches the content named by `key` until `expires_at` unless it renews."""

    key: bytes
    holder: Contact


# The refusals of a lease table; each names the field they are about, the key.


class LeaseHeldElsewhere(PermissionDeniedError):
    """A renewal or release by a node that does not hold the lease."""

    def __init__(self, lease: FetchLease) -> None:
        super().__init__(f"the lease is held by another node ({lease.holder})", field="key")
        self.lease = lease


class NoLease(NotFoundError):
    """A renewal of a key nobody holds a lease on here (never granted, expired or released)."""

    def __init__(self) -> None:
        super().__init__("no lease is held on this key here", field="key")


# Distinct waiting nodes counted per lease; past it the count stops growing (it tells a holder
# that others wait, not an exact audience).
MAX_WAITERS_COUNTED = 4096


class LeaseCapReached(ResourceExhaustedError):
    """The table or the asker's share of it is full."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem, field="key")


@dataclass
class LeaseTableCounters:
    """Monotonic counters of one table (the node's Stats and metrics read them)."""

    granted: int = 0
    renewed: int = 0
    released: int = 0
    expired: int = 0
    # Asks answered "held by another node": askers told to wait for the holder.
    waiters: int = 0
    refused_cap: int = 0


@dataclass(frozen=True, slots=True)
class Grant:
    """Answer to an acquisition: `lease` is the caller's when `granted`, another's otherwise."""

    granted: bool
    lease: FetchLease


class LeaseTable:
    """Leases this node keeps as the authority for their keys.

    First asker wins; a lease lives `ttl` seconds unless its holder renews it; only the holder
    (same node ID and address) renews or releases it; an expired lease is gone, and the next
    asker gets it. Bounded: at most `max_leases` in all and `max_per_holder` per holder.
    """

    def __init__(
        self, *, max_leases: int, max_per_holder: int, default_ttl: float, max_ttl: float
    ) -> None:
        if min(max_leases, max_per_holder) < 1:
            raise ValueError("max_leases and max_per_holder must be at least 1")
        if not 0 < default_ttl <= max_ttl:
            raise ValueError("default_ttl must be positive and at most max_ttl")
        self.max_leases = max_leases
        self.max_per_holder = max_per_holder
        self.default_ttl = default_ttl
        self.max_ttl = max_ttl
        self.counters = LeaseTableCounters()
        self._leases: dict[bytes, FetchLease] = {}
        self._per_holder: Counter[bytes] = Counter()
        # Key -> IDs of the other nodes told its holder is fetching, since it was granted.
        self._waiters: dict[bytes, set[bytes]] = {}
        # (expires_at, key); entries outdated by a renewal or release are skipped lazily.
        self._expiry: list[tuple[float, bytes]] = []

    def __len__(self) -> int:
        """Leases kept (call `expire` first to count only live ones)."""
        return len(self._leases)

    def applied_ttl(self, ttl: float) -> float:
        """The TTL a request for `ttl` gets: 0 means the default, more than the maximum is
        cut to it (as provider records' TTLs are)."""
        return min(ttl if ttl > 0 else self.default_ttl, self.max_ttl)

    def get(self, key: bytes, now: float) -> FetchLease | None:
        """The live lease on `key`, if any."""
        self.expire(now)
        return self._leases.get(key)

    def acquire(self, key: bytes, caller: Contact, ttl: float, now: float) -> Grant:
        """Grant `key` to `caller` unless another node holds it; the holder asking again
        keeps it with a fresh TTL (a retried call must not look like a lost lease)."""
        check_id(key)
        self.expire(now)
        current = self._leases.get(key)
        if current is not None and not same_node(current.holder, caller):
            self.counters.waiters += 1
            waiting = self._waiters.setdefault(key, set())
            if len(waiting) < MAX_WAITERS_COUNTED:
                waiting.add(caller.node_id)
            return Grant(False, current)
        if current is None:
            if len(self._leases) >= self.max_leases:
                self.counters.refused_cap += 1
                raise LeaseCapReached(f"this node keeps at most {self.max_leases} leases")
            if self._per_holder[caller.node_id] >= self.max_per_holder:
                self.counters.refused_cap += 1
                raise LeaseCapReached(f"at most {self.max_per_holder} leases per node")
            self.counters.granted += 1
        return Grant(True, self._put(key, caller, ttl, now))

    def renew(self, key: bytes, caller: Contact, ttl: float, now: float) -> FetchLease:
        """Extend the caller's lease; NoLease or LeaseHeldElsewhere otherwise."""
        self.expire(now)
        current = self._leases.get(key)
        if current is None:
            raise NoLease()
        if not same_node(current.holder, caller):
            raise LeaseHeldElsewhere(current)
        self.counters.renewed += 1
        return self._put(key, caller, ttl, now)

    def release(self, key: bytes, caller: Contact, now: float) -> bool:
        """End the caller's lease at once (True), False when none is held on `key`;
        LeaseHeldElsewhere when another node holds it."""
        self.expire(now)
        current = self._leases.get(key)
        if current is None:
            return False
        if not same_node(current.holder, caller):
            raise LeaseHeldElsewhere(current)
        self._delete(key)
        self.counters.released += 1
        return True

    def expire(self, now: float) -> list[FetchLease]:
        """Drop leases past their expiry; returns them."""
        gone: list[FetchLease] = []
        while self._expiry and self._expiry[0][0] <= now:
            expires_at, key = heapq.heappop(self._expiry)
            lease = self._leases.get(key)
            if lease is not None and lease.expires_at == expires_at:
                self._delete(key)
                gone.append(lease)
        self.counters.expired += len(gone)
        return gone

    def waiters(self, key: bytes) -> int:
        """Distinct other nodes told the lease on `key` is held, since it was granted: the
        holder learns from it that others wait for its download."""
        return len(self._waiters.get(key, ()))

    def held_by(self, node_id: bytes) -> int:
        """Number of leases `node_id` holds here."""
        return self._per_holder[node_id]

    def _put(self, key: bytes, holder: Contact, ttl: float, now: float) -> FetchLease:
        if key not in self._leases:
            self._per_holder[holder.node_id] += 1
        lease = FetchLease(key, holder, expires_at=now + self.applied_ttl(ttl))
        self._leases[key] = lease
        heapq.heappush(self._expiry, (lease.expires_at, key))
        return lease

    def _delete(self, key: bytes) -> None:
        lease = self._leases.pop(key)
        self._waiters.pop(key, None)
        self._per_holder[lease.holder.node_id] -= 1
        if self._per_holder[lease.holder.node_id] <= 0:
            del self._per_holder[lease.holder.node_id]


def same_node(holder: Contact, caller: Contact) -> bool:
    """Whether `caller` is `holder`: same node ID at the same address. As for provider
    records, a node cannot act for another address (with mutual TLS the address is bound to
    the caller's certificate)."""
    return holder.node_id == caller.node_id and holder.address == caller.address


def lease_authorities(key: bytes, me: Contact, others: Iterable[Contact]) -> list[Contact]:
    """Who decides on `key`'s lease, in the order to ask: this node and the nodes a lookup
    found, closest to the key first. The first that answers is authoritative; when it dies
    the next-closest takes over (it knows no lease, so it grants again: a bounded extra
    fetch during churn, never a lost one)."""
    unique = {c.node_id: c for c in others if c.node_id != me.node_id}
    unique[me.node_id] = me
    return sorted(unique.values(), key=lambda c: xor_distance(c.node_id, key))
