"""Provider records kept for other nodes (expiry, liveness) and our own republish schedule."""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from services.discovery.kademlia.contact import Contact
from services.discovery.kademlia.expiring import Expiring
from services.discovery.kademlia.node_id import check_id, dht_key

# Defaults of discovery.max_records_per_peer and discovery.max_records_total: a record costs
# about 470 bytes, so the total stays near 45 MiB, well inside the 128 MiB of deploy/k3s.
DEFAULT_MAX_PER_PROVIDER = 20_000
DEFAULT_MAX_TOTAL = 100_000
# Outdated expiry entries tolerated beyond twice the records before the heap is rebuilt.
EXPIRY_SLACK = 64


@dataclass(frozen=True, slots=True)
class ProviderRecord(Expiring):
    """`provider` holds the content named by `key` until `expires_at` (caller's clock)."""

    key: bytes
    provider: Contact


class ProviderStore:
    """Records other nodes asked us to keep, because our ID is among the k closest to the key.

    Bounded: at most `max_per_provider` records per provider node and `max_total` in all; at
    the total cap a new record takes the place of one of the provider holding the most, so
    one flooding node cannot crowd out the others. Also tracks when each provider node was
    last heard from, so the caller can probe silent providers and drop every record of one
    found dead (`remove_node`). Expiry works from a heap: a tick costs what is due, not a
    walk over every record.
    """

    def __init__(
        self,
        *,
        max_ttl: float = 600.0,
        max_per_provider: int = DEFAULT_MAX_PER_PROVIDER,
        max_total: int = DEFAULT_MAX_TOTAL,
    ) -> None:
        if max_ttl <= 0:
            raise ValueError("max_ttl must be positive")
        if max_per_provider < 1 or max_total < 1:
            raise ValueError("max_per_provider and max_total must be at least 1")
        self.max_ttl = max_ttl
        self.max_per_provider = max_per_provider
        self.max_total = max_total
        self._records: dict[bytes, dict[bytes, ProviderRecord]] = {}
        self._keys_of: dict[bytes, set[bytes]] = {}  # provider node id -> keys
        self._last_seen: dict[bytes, float] = {}  # provider node id -> when heard from
        # provider node id -> the contact of its latest record (probes dial it)
        self._contact_of: dict[bytes, Contact] = {}
        # (expires_at, key, provider id); entries outdated by a refresh are skipped lazily,
        # and the heap is rebuilt when they outnumber the records.
        self._expiry: list[tuple[float, bytes, bytes]] = []
        self._count = 0

    def __len__(self) -> int:
        """Number of records stored (call `expire` first to count only unexpired ones)."""
        return self._count

    def add(self, key: bytes, provider: Contact, ttl: float, now: float) -> float:
        """Stores or refreshes a record; returns the TTL applied (capped at max_ttl), 0.0
        when nothing was stored (no TTL, or a new record over the caps)."""
        check_id(key)
        applied = min(max(ttl, 0.0), self.max_ttl)
        if applied <= 0:
            return 0.0
        by_provider = self._records.get(key)
        if (by_provider is None or provider.node_id not in by_provider) and not self._room_for(
            provider.node_id
        ):
            return 0.0
        record = ProviderRecord(key, provider, expires_at=now + applied)
        by_provider = self._records.setdefault(key, {})
        if provider.node_id not in by_provider:
            self._count += 1
        by_provider[provider.node_id] = record
        self._keys_of.setdefault(provider.node_id, set()).add(key)
        self._contact_of[provider.node_id] = provider
        self._heard(provider.node_id, now)
        heapq.heappush(self._expiry, (record.expires_at, key, provider.node_id))
        if len(self._expiry) > 2 * self._count + EXPIRY_SLACK:
            self._compact()
        return applied

    def pending_expiries(self) -> int:
        """Entries in the expiry heap (live records plus outdated entries not yet dropped)."""
        return len(self._expiry)

    def _room_for(self, provider_id: bytes) -> bool:
        """Whether a new record of `provider_id` fits, making room at the total cap."""
        held = len(self._keys_of.get(provider_id, ()))
        if held >= self.max_per_provider:
            return False
        if self._count < self.max_total:
            return True
        # O(providers), only when the store is full: providers are nodes of the cluster.
        largest = max(self._keys_of, key=lambda pid: len(self._keys_of[pid]))
        if largest == provider_id or len(self._keys_of[largest]) <= held + 1:
            return False
        self._delete(next(iter(self._keys_of[largest])), largest)
        return True

    def _compact(self) -> None:
        self._expiry = [
            (r.expires_at, r.key, pid)
            for by_provider in self._records.values()
            for pid, r in by_provider.items()
        ]
        heapq.heapify(self._expiry)

    def remove(self, key: bytes, provider_id: bytes, address: str | None = None) -> bool:
        """Deletes one record (RemoveProvider). With `address`, only a record stored for
        that address goes: a node cannot withdraw records of another address."""
        record = self._records.get(key, {}).get(provider_id)
        if record is None or (address is not None and record.provider.address != address):
            return False
        self._delete(key, provider_id)
        return True

    def remove_node(self, provider_id: bytes) -> int:
        """Deletes every record of a provider found dead; returns how many."""
        keys = self._keys_of.get(provider_id)
        if not keys:
            self._last_seen.pop(provider_id, None)
            return 0
        removed = 0
        for key in list(keys):
            self._delete(key, provider_id)
            removed += 1
        return removed

    def get(
        self, key: bytes, now: float, limit: int | None = None, exclude: bytes | None = None
    ) -> list[ProviderRecord]:
        """Unexpired records for `key`, freshest first, at most `limit`, without `exclude`."""
        by_provider = self._records.get(key)
        if not by_provider:
            return []
        live = [
            r for r in by_provider.values() if r.expires_at > now and r.provider.node_id != exclude
        ]
        live.sort(key=lambda r: r.expires_at, reverse=True)
        return live if limit is None else live[:limit]

    def expire(self, now: float) -> int:
        """Deletes records whose expiry has passed; returns how many."""
        removed = 0
        heap = self._expiry
        while heap and heap[0][0] <= now:
            expires_at, key, provider_id = heapq.heappop(heap)
            record = self._records.get(key, {}).get(provider_id)
            if record is not None and record.expires_at == expires_at:
                self._delete(key, provider_id)
                removed += 1
        return removed

    def keys(self) -> list[bytes]:
        """Keys with at least one record."""
        return list(self._records)

    # -- provider liveness ------------------------------------------------------------

    def heard_from(self, node_id: bytes, now: float) -> None:
        """Notes that a node answered or called us; only matters if it provides something."""
        if node_id in self._keys_of:
            self._heard(node_id, now)

    def contact_of(self, node_id: bytes) -> Contact | None:
        """The contact of a provider's latest record here, if it has any."""
        return self._contact_of.get(node_id)

    def provider_contacts(self) -> list[Contact]:
        """One contact per provider node with records here (address of its latest record)."""
        return list(self._contact_of.values())

    def probe_due(self, now: float, idle: float) -> list[Contact]:
        """Providers not heard from for `idle` seconds: ping them (one look per provider,
        none per record)."""
        cutoff = now - idle
        return [self._contact_of[pid] for pid, seen in self._last_seen.items() if seen <= cutoff]

    def silent(self, now: float, window: float) -> list[bytes]:
        """Provider nodes not heard from for longer than `window` seconds."""
        cutoff = now - window
        return [pid for pid, seen in self._last_seen.items() if seen < cutoff]

    def last_seen(self, node_id: bytes) -> float | None:
        """When a provider node was last heard from (None if it has no records here)."""
        return self._last_seen.get(node_id)

    # -- internals --------------------------------------------------------------------

    def _heard(self, node_id: bytes, now: float) -> None:
        self._last_seen[node_id] = max(self._last_seen.get(node_id, now), now)

    def _delete(self, key: bytes, provider_id: bytes) -> None:
        by_provider = self._records[key]
        del by_provider[provider_id]
        self._count -= 1
        if not by_provider:
            del self._records[key]
        keys = self._keys_of[provider_id]
        keys.discard(key)
        if not keys:
            del self._keys_of[provider_id]
            del self._contact_of[provider_id]
            self._last_seen.pop(provider_id, None)


@dataclass(frozen=True, slots=True)
class AdvertisedKey:
    """One key this node provides: the string it was advertised as and its DHT key."""

    name: str
    key: bytes


class AdvertisedKeys:
    """The keys this node provides and when each is next due for (re)publishing.

    New keys are due at once; `take_due` hands out due keys and schedules their next
    publish one interval later, so the service only asks what to publish now.
    """

    def __init__(self, republish_interval: float) -> None:
        if republish_interval <= 0:
            raise ValueError("republish_interval must be positive")
        self.republish_interval = republish_interval
        self._due: dict[str, float] = {}
        self._keys: dict[str, bytes] = {}
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, name: object) -> bool:
        return name in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._keys))

    def add(self, names: Iterable[str], now: float) -> int:
        """Starts advertising keys (due immediately); returns how many were new."""
        added = 0
        for name in names:
            if name in self._keys:
                continue
            self._keys[name] = dht_key(name)
            self._schedule(name, now)
            added += 1
        return added

    def remove(self, names: Iterable[str]) -> list[AdvertisedKey]:
        """Stops advertising keys; returns those that were advertised (to send removals)."""
        removed: list[AdvertisedKey] = []
        for name in names:
            key = self._keys.pop(name, None)
            if key is not None:
                del self._due[name]
                removed.append(AdvertisedKey(name, key))
        return removed

    def take_due(self, now: float, limit: int | None = None) -> list[AdvertisedKey]:
        """Keys due for publishing at `now` (at most `limit`), rescheduled one interval on."""
        out: list[AdvertisedKey] = []
        heap = self._heap
        while heap and heap[0][0] <= now and (limit is None or len(out) < limit):
            due, name = heapq.heappop(heap)
            if self._due.get(name) != due:
                continue  # withdrawn or rescheduled since
            out.append(AdvertisedKey(name, self._keys[name]))
            self._schedule(name, now + self.republish_interval)
        return out

    def retry(self, names: Iterable[str], at: float) -> None:
        """Reschedules keys whose publish failed to `at` (if sooner than planned)."""
        for name in names:
            if name in self._keys and at < self._due[name]:
                self._schedule(name, at)

    def next_due(self) -> float | None:
        """When the earliest key is due (None when nothing is advertised)."""
        heap = self._heap
        while heap and self._due.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)  # withdrawn or rescheduled since
        return heap[0][0] if heap else None

    def _schedule(self, name: str, at: float) -> None:
        self._due[name] = at
        heapq.heappush(self._heap, (at, name))
