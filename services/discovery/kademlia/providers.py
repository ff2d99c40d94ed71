"""Provider records kept for other nodes (expiry, liveness) and our own republish schedule."""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from services.discovery.kademlia.contact import Contact
from services.discovery.kademlia.node_id import check_id, dht_key


@dataclass(frozen=True, slots=True)
class ProviderRecord:
    """`provider` holds the content named by `key` until `expires_at` (caller's clock)."""

    key: bytes
    provider: Contact
    expires_at: float

    def ttl(self, now: float) -> float:
        """Seconds left, as sent in peer.proto's Provider.ttl."""
        return max(0.0, self.expires_at - now)


class ProviderStore:
    """Records other nodes asked us to keep, because our ID is among the k closest to the key.

    Also tracks when each provider node was last heard from, so the caller can probe
    silent providers and drop every record of one found dead (`remove_node`).
    """

    def __init__(self, *, max_ttl: float = 600.0) -> None:
        if max_ttl <= 0:
            raise ValueError("max_ttl must be positive")
        self.max_ttl = max_ttl
        self._records: dict[bytes, dict[bytes, ProviderRecord]] = {}
        self._keys_of: dict[bytes, set[bytes]] = {}  # provider node id -> keys
        self._last_seen: dict[bytes, float] = {}  # provider node id -> when heard from
        # (expires_at, key, provider id); entries outdated by a refresh are skipped lazily.
        self._expiry: list[tuple[float, bytes, bytes]] = []
        self._count = 0

    def __len__(self) -> int:
        """Number of records stored (call `expire` first to count only unexpired ones)."""
        return self._count

    def add(self, key: bytes, provider: Contact, ttl: float, now: float) -> float:
        """Stores or refreshes a record; returns the TTL applied (capped at max_ttl)."""
        check_id(key)
        applied = min(max(ttl, 0.0), self.max_ttl)
        if applied <= 0:
            return 0.0
        record = ProviderRecord(key, provider, now + applied)
        by_provider = self._records.setdefault(key, {})
        if provider.node_id not in by_provider:
            self._count += 1
        by_provider[provider.node_id] = record
        self._keys_of.setdefault(provider.node_id, set()).add(key)
        self._heard(provider.node_id, now)
        heapq.heappush(self._expiry, (record.expires_at, key, provider.node_id))
        return applied

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

    def provider_contacts(self) -> list[Contact]:
        """One contact per provider node with records here (address of its newest record)."""
        out: list[Contact] = []
        for provider_id, keys in self._keys_of.items():
            newest = max((self._records[k][provider_id] for k in keys), key=lambda r: r.expires_at)
            out.append(newest.provider)
        return out

    def probe_due(self, now: float, idle: float) -> list[Contact]:
        """Providers not heard from for `idle` seconds: ping them."""
        cutoff = now - idle
        due = {pid for pid, seen in self._last_seen.items() if seen <= cutoff}
        return [c for c in self.provider_contacts() if c.node_id in due]

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
