"""One DHT node's state and decisions without I/O, so the service and the simulation share them.

The gRPC service and the simulated network both drive this class, so what the simulation
proves is what the service runs.

Contract for the driver: call `heard_from` for every request received and every answer
received (with the contact as observed), `rpc_failed` for every call that errored or timed
out, and `maintenance` on a short tick (about a second); perform what it returns.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable
from dataclasses import dataclass, field

from services.discovery.kademlia.contact import Contact
from services.discovery.kademlia.lookup import DEFAULT_ALPHA, Lookup
from services.discovery.kademlia.node_id import ID_BYTES, id_int
from services.discovery.kademlia.peer_budget import PeerBudgets
from services.discovery.kademlia.providers import (
    DEFAULT_MAX_PER_PROVIDER,
    DEFAULT_MAX_TOTAL,
    AdvertisedKey,
    AdvertisedKeys,
    ProviderRecord,
    ProviderStore,
)
from services.discovery.kademlia.routing_table import DEFAULT_K, AddStatus, RoutingTable


@dataclass(frozen=True, slots=True)
class DhtConfig:
    """Protocol constants and the freshness timings (seconds)."""

    k: int = DEFAULT_K
    alpha: int = DEFAULT_ALPHA
    # Consecutive failed RPCs after which a node is taken for dead.
    max_failures: int = 2
    # A contact or provider not heard from for this long gets pinged.
    probe_interval: float = 10.0
    # A probe still unanswered after this long may be sent again.
    probe_timeout: float = 2.0
    # A contact or provider not heard from for this long is dropped, answers or not; with
    # probing every probe_interval this only bites when probes cannot be sent at all.
    liveness_window: float = 30.0
    # TTL we ask for on our records, and the most we grant to others' records.
    record_ttl: float = 600.0
    max_record_ttl: float = 600.0
    republish_interval: float = 120.0
    # Buckets with no lookup in their range for this long get a lookup of a random ID.
    refresh_interval: float = 600.0
    # Most keys in one AddProvider/RemoveProvider request, in and out; the service sets it
    # from discovery.max_keys_per_peer_call (this default, equal to that key's, serves the
    # simulation). Most providers in one answer.
    max_batch_keys: int = 1024
    max_providers_answer: int = 100
    # Bounds on records kept for others (discovery.max_records_per_peer, max_records_total,
    # peer_records_per_second); the burst of the rate is a peer's whole allowance.
    max_records_per_peer: int = DEFAULT_MAX_PER_PROVIDER
    max_records_total: int = DEFAULT_MAX_TOTAL
    peer_records_per_second: float = 1000.0

    def __post_init__(self) -> None:
        if self.k < 1 or self.alpha < 1 or self.max_failures < 1:
            raise ValueError("k, alpha and max_failures must be at least 1")
        if not 1 <= self.max_records_per_peer <= self.max_records_total:
            raise ValueError(
                "max_records_per_peer must be at least 1 and at most max_records_total"
            )
        if not self.peer_records_per_second > 0:
            raise ValueError("peer_records_per_second must be positive")
        if self.liveness_window <= self.probe_interval:
            raise ValueError("liveness_window must be longer than probe_interval")
        if self.republish_interval >= self.record_ttl:
            raise ValueError("republish_interval must be shorter than record_ttl")


@dataclass(frozen=True, slots=True)
class Maintenance:
    """What one maintenance tick decided; the driver performs it."""

    # Ping these; report with heard_from / rpc_failed.
    probes: list[Contact] = field(default_factory=list)
    # Nodes dropped this tick as silent beyond the liveness window.
    dropped: list[bytes] = field(default_factory=list)
    # Provider records that reached their expiry.
    expired_records: int = 0
    # Random IDs to look up, refreshing idle buckets.
    refresh: list[bytes] = field(default_factory=list)
    # Our keys to (re)publish: look each up, then AddProvider at the k closest.
    republish: list[AdvertisedKey] = field(default_factory=list)


class DhtNode:
    """Routing table + stored provider records + our advertised keys, and the rules tying them."""

    def __init__(
        self,
        me: Contact,
        config: DhtConfig | None = None,
        *,
        now: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        self.me = me
        self.config = config or DhtConfig()
        cfg = self.config
        self.table = RoutingTable(
            me.node_id,
            k=cfg.k,
            max_failures=cfg.max_failures,
            ping_timeout=cfg.probe_timeout,
            now=now,
        )
        self.store = ProviderStore(
            max_ttl=cfg.max_record_ttl,
            max_per_provider=cfg.max_records_per_peer,
            max_total=cfg.max_records_total,
        )
        self.budgets = PeerBudgets(
            cfg.peer_records_per_second, max(cfg.max_records_per_peer, cfg.max_batch_keys)
        )
        self.advertised = AdvertisedKeys(cfg.republish_interval)
        self._rng = rng or random.Random()
        self._failures: dict[bytes, int] = {}
        self._probing: dict[bytes, float] = {}

    @property
    def node_id(self) -> bytes:
        """This node's ID."""
        return self.me.node_id

    # -- liveness events --------------------------------------------------------------

    def heard_from(self, contact: Contact, now: float) -> Contact | None:
        """A node called us or answered us. Returns a contact to ping when this one wants
        a slot in a full bucket (ping-before-evict); report that ping like any other RPC."""
        if contact.node_id == self.me.node_id:
            return None
        self._failures.pop(contact.node_id, None)
        self._probing.pop(contact.node_id, None)
        self.store.heard_from(contact.node_id, now)
        result = self.table.add(contact, now)
        return result.ping if result.status is AddStatus.PING else None

    def rpc_failed(self, node_id: bytes, now: float) -> bool:
        """A call to `node_id` failed. Returns True when that made us drop the node.

        After max_failures in a row the node is taken for dead: it leaves the routing
        table and every provider record it had here goes, so answers stop naming it. A
        failed ping-before-evict only costs the node its routing-table slot.
        """
        self._probing.pop(node_id, None)
        evicted = self.table.record_failure(node_id, now) is not None
        failures = self._failures.get(node_id, 0) + 1
        if failures < self.config.max_failures:
            self._failures[node_id] = failures
            return evicted
        self._failures.pop(node_id, None)
        self.table.remove(node_id)
        self.store.remove_node(node_id)
        return True

    # -- requests served --------------------------------------------------------------

    def find_node(self, sender_id: bytes, target: bytes) -> list[Contact]:
        """FindNode: up to k contacts closest to `target`, never the caller."""
        return self.table.closest(target, self.config.k, exclude=sender_id)

    def get_providers(
        self, sender_id: bytes, key: bytes, limit: int, now: float
    ) -> tuple[list[ProviderRecord], list[Contact]]:
        """GetProviders: unexpired providers (freshest first) and the closest contacts."""
        wanted = limit if limit > 0 else self.config.k
        wanted = min(wanted, self.config.max_providers_answer)
        providers = self.store.get(key, now, limit=wanted) if len(key) == ID_BYTES else []
        closer = self.find_node(sender_id, key) if len(key) == ID_BYTES else []
        return providers, closer

    def add_provider(
        self, sender: Contact, keys: Iterable[bytes], ttl: float, now: float
    ) -> tuple[int, float]:
        """AddProvider: stores `sender` as provider of `keys`; returns (stored, TTL applied).

        `sender` must carry the address observed on the connection. A TTL of 0 means the
        default; keys past max_batch_keys and malformed keys are skipped, so are keys this
        node is not among the k closest to (`responsible`) and new records over the caps.
        Raises RecordRateExceeded, storing nothing, when the sender is over its record rate.
        """
        applied = min(ttl if ttl > 0 else self.config.record_ttl, self.config.max_record_ttl)
        batch = [key for key in itertools.islice(keys, self.config.max_batch_keys)]
        self.budgets.spend(sender.node_id, len(batch), now)
        stored = 0
        for key in batch:
            if (
                len(key) == ID_BYTES
                and self.responsible(key, sender.node_id)
                and self.store.add(key, sender, applied, now) > 0
            ):
                stored += 1
        return stored, applied

    def responsible(self, key: bytes, publisher: bytes) -> bool:
        """Whether this node keeps records of `key`: fewer than k contacts it knows (other
        than the publisher, which does not store at itself) are closer to the key. A
        publisher finds the k closest nodes by lookup, so honest records always land on
        nodes that take them; records for far keys, which nobody would look for here, do
        not fill this node."""
        target = id_int(key)
        own = self.me.key ^ target
        # A contact closer to the key than we are shares at least as many leading bits with us
        # as the key does, so it sits in the key's bucket or a later one; the walk stops at k
        # (in a large network the key's bucket is full and closer: about k steps).
        closer = 0
        table = self.table
        for index in range(table.bucket_of(key), table.bucket_count):
            for contact in table.bucket_contacts(index):
                if contact.key ^ target < own and contact.node_id != publisher:
                    closer += 1
                    if closer >= self.config.k:
                        return False
        return True

    def remove_provider(self, sender: Contact, keys: Iterable[bytes]) -> int:
        """RemoveProvider: deletes `sender`'s records (at its observed address) for `keys`."""
        removed = 0
        for index, key in enumerate(keys):
            if index >= self.config.max_batch_keys:
                break
            if self.store.remove(key, sender.node_id, address=sender.address):
                removed += 1
        return removed

    # -- lookups we run ---------------------------------------------------------------

    def start_lookup(
        self,
        target: bytes,
        now: float,
        *,
        find_providers: bool = False,
        provider_limit: int | None = None,
    ) -> Lookup:
        """A lookup of `target` seeded with the k closest contacts we know."""
        self.table.note_lookup(target, now)
        return Lookup(
            target,
            self.table.closest(target, self.config.k),
            k=self.config.k,
            alpha=self.config.alpha,
            self_id=self.me.node_id,
            find_providers=find_providers,
            provider_limit=provider_limit,
        )

    def join_refresh(self, now: float) -> list[bytes]:
        """Targets to look up after the lookup of our own ID that joins the network: one
        random ID in every bucket farther than our own range, as the Kademlia paper
        prescribes. Without it a newcomer knows little beyond its own neighbourhood, and
        lookups from there can settle on a wrong set of "closest" nodes."""
        return self.table.refresh_targets(now, 0.0, self._rng, skip_own_range=True)

    # -- periodic work ----------------------------------------------------------------

    def maintenance(self, now: float) -> Maintenance:
        """Expires records, drops nodes silent beyond the liveness window, and says which
        nodes to probe, which buckets to refresh and which of our keys to republish."""
        cfg = self.config
        expired = self.store.expire(now)
        self.budgets.prune(now)
        dropped = [c.node_id for c in self.table.expire(now, cfg.liveness_window)]
        dropped.extend(self.store.silent(now, cfg.liveness_window))
        for node_id in dropped:
            self.store.remove_node(node_id)
            self._failures.pop(node_id, None)
            self._probing.pop(node_id, None)
        # Failure counts of nodes we no longer track would only accumulate.
        for node_id in [
            n for n in self._failures if n not in self.table and self.store.last_seen(n) is None
        ]:
            del self._failures[node_id]

        probes: dict[bytes, Contact] = {}
        candidates = [
            *self.table.probe_due(now, cfg.probe_interval),
            *self.store.probe_due(now, cfg.probe_interval),
        ]
        for contact in candidates:
            sent = self._probing.get(contact.node_id)
            if sent is not None and now - sent < cfg.probe_timeout:
                continue
            probes[contact.node_id] = contact
            self._probing[contact.node_id] = now
        return Maintenance(
            probes=list(probes.values()),
            dropped=list(dict.fromkeys(dropped)),
            expired_records=expired,
            refresh=self.table.refresh_targets(now, cfg.refresh_interval, self._rng),
            republish=self.advertised.take_due(now),
        )
