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
    asker gets it. An asker may bound how many other nodes one holder is to serve
    (`max_waiters`): past it the next asker gets a lease of its own, so a key can have several
    holders, each fetching for its share of the askers. Bounded: at most `max_leases` in all and
    `max_per_holder` per holder.
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
        # Key -> holder node ID -> lease, oldest first.
        self._leases: dict[bytes, dict[bytes, FetchLease]] = {}
        self._count = 0
        self._per_holder: Counter[bytes] = Counter()
        # (key, holder node ID) -> IDs of the other nodes told that holder is fetching.
        self._waiters: dict[tuple[bytes, bytes], set[bytes]] = {}
        # (expires_at, key, holder node ID); entries outdated by a renewal or release are
        # skipped lazily.
        self._expiry: list[tuple[float, bytes, bytes]] = []

    def __len__(self) -> int:
        """Leases kept (call `expire` first to count only live ones)."""
        return self._count

    def applied_ttl(self, ttl: float) -> float:
        """The TTL a request for `ttl` gets: 0 means the default, more than the maximum is
        cut to it (as provider records' TTLs are)."""
        return min(ttl if ttl > 0 else self.default_ttl, self.max_ttl)

    def get(self, key: bytes, now: float) -> FetchLease | None:
        """The oldest live lease on `key`, if any."""
        self.expire(now)
        holders = self._leases.get(key)
        return _oldest(holders) if holders else None

    def lease_of(self, key: bytes, node_id: bytes, now: float) -> FetchLease | None:
        """The live lease `node_id` holds on `key`, if any."""
        self.expire(now)
        return self._leases.get(key, {}).get(node_id)

    def acquire(
        self, key: bytes, caller: Contact, ttl: float, now: float, max_waiters: int = 0
    ) -> Grant:
        """Grant `key` to `caller` unless a holder of it has room for one more waiter (at most
        `max_waiters`, 0: no bound), whom it is then told; the holder asking again keeps its
        lease with a fresh TTL (a retried call must not look like a lost lease), and a node
        told a holder is told the same one while it lasts."""
        check_id(key)
        self.expire(now)
        holders = self._leases.get(key, {})
        own = holders.get(caller.node_id)
        if own is not None and same_node(own.holder, caller):
            return Grant(True, self._put(key, caller, ttl, now))
        told = self._told(key, holders, caller, max_waiters)
        if told is not None:
            return Grant(False, told)
        if self._count >= self.max_leases:
            self.counters.refused_cap += 1
            raise LeaseCapReached(f"this node keeps at most {self.max_leases} leases")
        if self._per_holder[caller.node_id] >= self.max_per_holder:
            self.counters.refused_cap += 1
            raise LeaseCapReached(f"at most {self.max_per_holder} leases per node")
        self.counters.granted += 1
        return Grant(True, self._put(key, caller, ttl, now))

    def _told(
        self, key: bytes, holders: dict[bytes, FetchLease], caller: Contact, max_waiters: int
    ) -> FetchLease | None:
        """The holder `caller` is to wait for: the one it was told before, else the one with
        the fewest waiters below the bound (the oldest among equals), else, for a node ID that
        holds a lease from another address, that lease (it never gets a second one). None:
        `caller` is to fetch itself."""
        for holder_id, lease in holders.items():
            if caller.node_id in self._waiters.get((key, holder_id), ()):
                self.counters.waiters += 1
                return lease
        room = [
            holder_id
            for holder_id in holders
            if holder_id != caller.node_id
            and (max_waiters <= 0 or self.waiters(key, holder_id) < max_waiters)
        ]
        if room:
            # min() keeps the first of equals: the oldest holder.
            holder_id = min(room, key=lambda h: self.waiters(key, h))
            self.counters.waiters += 1
            waiting = self._waiters.setdefault((key, holder_id), set())
            if len(waiting) < MAX_WAITERS_COUNTED:
                waiting.add(caller.node_id)
            return holders[holder_id]
        return holders.get(caller.node_id)

    def renew(self, key: bytes, caller: Contact, ttl: float, now: float) -> FetchLease:
        """Extend the caller's lease; NoLease or LeaseHeldElsewhere otherwise."""
        self.expire(now)
        holders = self._leases.get(key)
        if not holders:
            raise NoLease()
        _own_lease(holders, caller)
        self.counters.renewed += 1
        return self._put(key, caller, ttl, now)

    def release(self, key: bytes, caller: Contact, now: float) -> bool:
        """End the caller's lease at once (True), False when none is held on `key`;
        LeaseHeldElsewhere when only other nodes hold it."""
        self.expire(now)
        holders = self._leases.get(key)
        if not holders:
            return False
        _own_lease(holders, caller)
        self._delete(key, caller.node_id)
        self.counters.released += 1
        return True

    def expire(self, now: float) -> list[FetchLease]:
        """Drop leases past their expiry; returns them."""
        gone: list[FetchLease] = []
        while self._expiry and self._expiry[0][0] <= now:
            expires_at, key, holder_id = heapq.heappop(self._expiry)
            lease = self._leases.get(key, {}).get(holder_id)
            if lease is not None and lease.expires_at == expires_at:
                self._delete(key, holder_id)
                gone.append(lease)
        self.counters.expired += len(gone)
        return gone

    def waiters(self, key: bytes, holder_id: bytes | None = None) -> int:
        """Distinct other nodes told that the holder `holder_id` of `key` (every holder of it
        when None) is fetching, since its lease was granted: a holder learns from it that
        others wait for its download."""
        if holder_id is not None:
            return len(self._waiters.get((key, holder_id), ()))
        return sum(len(self._waiters.get((key, h), ())) for h in self._leases.get(key, {}))

    def held_by(self, node_id: bytes) -> int:
        """Number of leases `node_id` holds here."""
        return self._per_holder[node_id]

    def _put(self, key: bytes, holder: Contact, ttl: float, now: float) -> FetchLease:
        holders = self._leases.setdefault(key, {})
        if holder.node_id not in holders:
            self._per_holder[holder.node_id] += 1
            self._count += 1
        lease = FetchLease(key, holder, expires_at=now + self.applied_ttl(ttl))
        holders[holder.node_id] = lease
        heapq.heappush(self._expiry, (lease.expires_at, key, holder.node_id))
        return lease

    def _delete(self, key: bytes, holder_id: bytes) -> None:
        holders = self._leases[key]
        del holders[holder_id]
        if not holders:
            del self._leases[key]
        self._count -= 1
        self._waiters.pop((key, holder_id), None)
        self._per_holder[holder_id] -= 1
        if self._per_holder[holder_id] <= 0:
            del self._per_holder[holder_id]


def _oldest(holders: dict[bytes, FetchLease]) -> FetchLease:
    """The first granted of a key's (non-empty) leases."""
    return next(iter(holders.values()))


def _own_lease(holders: dict[bytes, FetchLease], caller: Contact) -> FetchLease:
    """`caller`'s lease among a key's (non-empty) `holders`; LeaseHeldElsewhere naming the
    lease of its node ID from another address, else the oldest, when it holds none."""
    own = holders.get(caller.node_id)
    if own is None or not same_node(own.holder, caller):
        raise LeaseHeldElsewhere(own if own is not None else _oldest(holders))
    return own


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
