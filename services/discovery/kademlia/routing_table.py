"""Kademlia routing table: k-buckets with least-recently-seen order and ping-before-evict.

Layout: buckets split on the range that holds our own ID, as in the Kademlia paper. With
d buckets, bucket i < d-1 holds the contacts whose ID shares exactly i leading bits with
ours, and the last bucket holds everything sharing d-1 bits or more (our own range). Only
the last bucket ever splits, when it is full and a newcomer falls into it; a full bucket
of any other range keeps its old contacts (they are the ones proven to stay up) and asks
the caller to ping its least-recently-seen one before making room. The paper's relaxed
splitting of far buckets for unbalanced trees is not done: node IDs are uniformly random.
"""

from __future__ import annotations

import enum
import random
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from services.discovery.kademlia.contact import Contact
from services.discovery.kademlia.node_id import ID_BITS, check_id, id_int, int_id

DEFAULT_K = 20


class AddStatus(enum.Enum):
    """What `RoutingTable.add` did with a contact."""

    ADDED = "added"
    """Newly inserted at the tail of its bucket."""
    UPDATED = "updated"
    """Already present: moved to the tail (most recently seen)."""
    PING = "ping"
    """Bucket full: newcomer cached; the caller must ping `AddResult.ping` and report."""
    CACHED = "cached"
    """Bucket full and already waiting on a ping: newcomer kept in the replacement cache."""
    IGNORED = "ignored"
    """Our own ID: never stored."""


@dataclass(frozen=True, slots=True)
class AddResult:
    """Outcome of `RoutingTable.add`."""

    status: AddStatus
    ping: Contact | None = None
    """With PING: the least-recently-seen contact to ping. Report the answer with
    `add` (it answered) or `record_failure` (it did not)."""


@dataclass(frozen=True, slots=True)
class PeerEntry:
    """A routing-table entry as shown to operators."""

    contact: Contact
    last_seen: float
    failures: int


@dataclass(slots=True)
class _Entry:
    contact: Contact
    last_seen: float
    failures: int = 0


@dataclass(slots=True)
class _Pending:
    """A ping-before-evict in flight: `lrs` is being pinged because `newcomer` wanted in."""

    lrs: bytes
    newcomer: bytes
    since: float


class _Bucket:
    __slots__ = ("entries", "last_lookup", "pending", "replacements")

    def __init__(self, last_lookup: float) -> None:
        # Least recently seen first; most recently seen last.
        self.entries: OrderedDict[bytes, _Entry] = OrderedDict()
        # Candidates for a slot, most recently seen last.
        self.replacements: OrderedDict[bytes, _Entry] = OrderedDict()
        self.pending: _Pending | None = None
        self.last_lookup = last_lookup


class RoutingTable:
    """The contacts one node knows, organised for XOR-closest queries."""

    def __init__(
        self,
        own_id: bytes,
        *,
        k: int = DEFAULT_K,
        max_failures: int = 2,
        replacement_cache: int | None = None,
        ping_timeout: float = 10.0,
        now: float = 0.0,
    ) -> None:
        """`max_failures` consecutive failed RPCs remove a contact; a ping-before-evict
        nobody reported on within `ping_timeout` seconds is forgotten and may be reissued."""
        if k < 1 or max_failures < 1:
            raise ValueError("k and max_failures must be at least 1")
        self.own_id = check_id(own_id)
        self.k = k
        self.max_failures = max_failures
        self.replacement_cache = k if replacement_cache is None else replacement_cache
        self.ping_timeout = ping_timeout
        self._own = id_int(own_id)
        self._buckets: list[_Bucket] = [_Bucket(now)]
        self._size = 0

    # -- inspection -------------------------------------------------------------------

    def __len__(self) -> int:
        return self._size

    def __contains__(self, node_id: object) -> bool:
        return isinstance(node_id, bytes) and self._find(node_id) is not None

    def __iter__(self) -> Iterator[Contact]:
        for bucket in self._buckets:
            for entry in bucket.entries.values():
                yield entry.contact

    def get(self, node_id: bytes) -> Contact | None:
        """The stored contact for an ID, if any."""
        entry = self._find(node_id)
        return entry.contact if entry else None

    @property
    def bucket_count(self) -> int:
        """Number of buckets (grows by splitting our own range)."""
        return len(self._buckets)

    def bucket_of(self, node_id: bytes) -> int:
        """Index of the bucket whose range holds `node_id`."""
        return self._index(id_int(node_id))

    def bucket_contacts(self, index: int) -> list[Contact]:
        """Contacts of one bucket, least recently seen first."""
        return [e.contact for e in self._buckets[index].entries.values()]

    def replacements(self, index: int) -> list[Contact]:
        """Replacement cache of one bucket, most recently seen last."""
        return [e.contact for e in self._buckets[index].replacements.values()]

    def peers(self) -> list[PeerEntry]:
        """Every contact with its liveness data, closest to our own ID first."""
        entries = [e for b in self._buckets for e in b.entries.values()]
        entries.sort(key=lambda e: e.contact.key ^ self._own)
        return [PeerEntry(e.contact, e.last_seen, e.failures) for e in entries]

    # -- updates ----------------------------------------------------------------------

    def add(self, contact: Contact, now: float) -> AddResult:
        """Records that `contact` was heard from (it called us, or answered our call)."""
        key = contact.key
        if key == self._own:
            return AddResult(AddStatus.IGNORED)
        index = self._index(key)
        bucket = self._buckets[index]
        entry = bucket.entries.get(contact.node_id)
        if entry is not None:
            self._refresh(bucket, entry, contact, now)
            return AddResult(AddStatus.UPDATED)
        while (
            len(bucket.entries) >= self.k
            and index == len(self._buckets) - 1
            and len(self._buckets) < ID_BITS
        ):
            self._split()
            index = self._index(key)
            bucket = self._buckets[index]
        if len(bucket.entries) < self.k:
            bucket.replacements.pop(contact.node_id, None)
            bucket.entries[contact.node_id] = _Entry(contact, now)
            self._size += 1
            return AddResult(AddStatus.ADDED)
        self._cache(bucket, _Entry(contact, now))
        pending = bucket.pending
        if pending is not None and now - pending.since < self.ping_timeout:
            return AddResult(AddStatus.CACHED)
        lrs = next(iter(bucket.entries.values()))
        bucket.pending = _Pending(lrs.contact.node_id, contact.node_id, now)
        return AddResult(AddStatus.PING, lrs.contact)

    def record_failure(self, node_id: bytes, now: float) -> Contact | None:
        """An RPC to `node_id` failed. Returns the contact if this removed it.

        The contact of a pending ping-before-evict is evicted at once (its newcomer takes
        the slot); any other contact goes after `max_failures` consecutive failures.
        """
        known = self._forget_replacement(node_id)
        if known is None:
            return None
        bucket, entry = known
        pending = bucket.pending
        if pending is not None and pending.lrs == node_id:
            bucket.pending = None
            self._drop(bucket, node_id, prefer=pending.newcomer)
            return entry.contact
        entry.failures += 1
        if entry.failures < self.max_failures:
            return None
        self._drop(bucket, node_id)
        return entry.contact

    def _forget_replacement(self, node_id: bytes) -> tuple[_Bucket, _Entry] | None:
        """Drops `node_id` from its bucket's replacement cache; its bucket and table entry,
        None when it is this node or not in the table."""
        key = id_int(node_id)
        if key == self._own:
            return None
        bucket = self._buckets[self._index(key)]
        bucket.replacements.pop(node_id, None)
        entry = bucket.entries.get(node_id)
        return None if entry is None else (bucket, entry)

    def remove(self, node_id: bytes) -> Contact | None:
        """Forgets a contact (and any replacement-cache entry for it)."""
        known = self._forget_replacement(node_id)
        if known is None:
            return None
        bucket, entry = known
        if bucket.pending is not None and bucket.pending.lrs == node_id:
            bucket.pending = None
        self._drop(bucket, node_id)
        return entry.contact

    # -- queries ----------------------------------------------------------------------

    def closest(
        self, target: bytes, n: int | None = None, exclude: bytes | None = None
    ) -> list[Contact]:
        """Up to `n` (default k) contacts closest to `target` by XOR distance, closest first.

        Walks buckets instead of sorting the whole table. Let c be the bucket whose range
        holds the target. Bucket c's contacts share one more bit with the target than
        those of buckets after c, which share one more than bucket c-1's, then c-2's, and
        so on; so only contacts within one of those groups need sorting.
        """
        limit = self.k if n is None else n
        if limit <= 0:
            return []
        t = id_int(target)
        buckets = self._buckets
        start = self._index(t)
        found: list[Contact] = []
        groups: list[list[Contact]] = [[e.contact for e in buckets[start].entries.values()]]
        if start < len(buckets) - 1:
            groups.append([e.contact for b in buckets[start + 1 :] for e in b.entries.values()])
        groups_iter = iter(groups)
        index = start
        while len(found) < limit:
            group = next(groups_iter, None)
            if group is None:
                index -= 1
                if index < 0:
                    break
                group = [e.contact for e in buckets[index].entries.values()]
            group.sort(key=lambda c: c.key ^ t)
            for contact in group:
                if contact.node_id != exclude:
                    found.append(contact)
                    if len(found) >= limit:
                        break
        return found

    def probe_due(self, now: float, idle: float) -> list[Contact]:
        """Contacts not heard from for `idle` seconds: ping them to learn if they live."""
        cutoff = now - idle
        return [
            e.contact for b in self._buckets for e in b.entries.values() if e.last_seen <= cutoff
        ]

    def expire(self, now: float, window: float) -> list[Contact]:
        """Removes contacts silent for longer than `window` seconds; returns them."""
        cutoff = now - window
        removed: list[Contact] = []
        for bucket in self._buckets:
            for node_id in [k for k, e in bucket.replacements.items() if e.last_seen < cutoff]:
                del bucket.replacements[node_id]
            stale = [e for e in bucket.entries.values() if e.last_seen < cutoff]
            for entry in stale:
                if bucket.pending is not None and bucket.pending.lrs == entry.contact.node_id:
                    bucket.pending = None
                self._drop(bucket, entry.contact.node_id)
                removed.append(entry.contact)
        return removed

    def note_lookup(self, target: bytes, now: float) -> None:
        """A lookup for `target` ran, which refreshes the bucket covering it."""
        self._buckets[self._index(id_int(target))].last_lookup = now

    def refresh_targets(
        self, now: float, interval: float, rng: random.Random, *, skip_own_range: bool = False
    ) -> list[bytes]:
        """Random IDs to look up, one per bucket with no lookup in `interval` seconds
        (`skip_own_range`: not for the last bucket, which a lookup of our own ID covers).

        Marks those buckets refreshed: the caller is expected to run the lookups.
        """
        targets: list[bytes] = []
        last = len(self._buckets) - 1
        for index, bucket in enumerate(self._buckets):
            if now - bucket.last_lookup < interval or (skip_own_range and index == last):
                continue
            bucket.last_lookup = now
            targets.append(self._random_id_in(index, last, rng))
        return targets

    # -- internals --------------------------------------------------------------------

    def _index(self, key: int) -> int:
        cpl = ID_BITS - (key ^ self._own).bit_length()
        return min(cpl, len(self._buckets) - 1)

    def _find(self, node_id: bytes) -> _Entry | None:
        if len(node_id) != len(self.own_id):
            return None
        return self._buckets[self._index(id_int(node_id))].entries.get(node_id)

    def _refresh(self, bucket: _Bucket, entry: _Entry, contact: Contact, now: float) -> None:
        # The newest address wins: a node keeps its ID across restarts, not its IP.
        entry.contact = contact
        entry.last_seen = max(entry.last_seen, now)
        entry.failures = 0
        bucket.entries.move_to_end(contact.node_id)
        pending = bucket.pending
        if pending is not None and pending.lrs == contact.node_id:
            # It answered (or called us): it stays, and the newcomer that wanted its slot
            # is dropped, as the paper prescribes.
            bucket.pending = None
            bucket.replacements.pop(pending.newcomer, None)

    def _cache(self, bucket: _Bucket, entry: _Entry) -> None:
        bucket.replacements.pop(entry.contact.node_id, None)
        bucket.replacements[entry.contact.node_id] = entry
        while len(bucket.replacements) > self.replacement_cache:
            bucket.replacements.popitem(last=False)

    def _drop(self, bucket: _Bucket, node_id: bytes, prefer: bytes | None = None) -> None:
        """Removes an entry and promotes a replacement (`prefer` if cached, else the freshest)."""
        del bucket.entries[node_id]
        self._size -= 1
        if not bucket.replacements:
            return
        if prefer is not None and prefer in bucket.replacements:
            promoted = bucket.replacements.pop(prefer)
        else:
            _, promoted = bucket.replacements.popitem(last=True)
        promoted.failures = 0
        self._insert_by_last_seen(bucket, promoted)
        self._size += 1

    @staticmethod
    def _insert_by_last_seen(bucket: _Bucket, entry: _Entry) -> None:
        entries = bucket.entries
        if entries and next(reversed(entries.values())).last_seen > entry.last_seen:
            ordered = sorted([*entries.values(), entry], key=lambda e: e.last_seen)
            entries.clear()
            entries.update((e.contact.node_id, e) for e in ordered)
        else:
            entries[entry.contact.node_id] = entry

    def _split(self) -> None:
        """Splits the last bucket (our own range) in two by the next bit of our ID."""
        old = self._buckets[-1]
        depth = len(self._buckets)  # contacts sharing >= depth bits move to the new bucket
        new = _Bucket(old.last_lookup)
        for source, target in ((old.entries, new.entries), (old.replacements, new.replacements)):
            moving = [
                nid
                for nid, e in source.items()
                if ID_BITS - (e.contact.key ^ self._own).bit_length() >= depth
            ]
            for node_id in moving:  # in order, so least-recently-seen order is kept
                target[node_id] = source.pop(node_id)
        if old.pending is not None and old.pending.lrs in new.entries:
            new.pending, old.pending = old.pending, None
        self._buckets.append(new)

    def _random_id_in(self, index: int, last: int, rng: random.Random) -> bytes:
        """A random ID in bucket `index`'s range (sharing exactly `index` bits, or more for
        the last bucket)."""
        if index == last:
            free = ID_BITS - index  # bits after the shared prefix
            return int_id((self._own & ~((1 << free) - 1)) | rng.getrandbits(free))
        free = ID_BITS - 1 - index  # bits after the first differing one
        flip = 1 << free
        return int_id(((self._own ^ flip) & ~(flip - 1)) | rng.getrandbits(free))
