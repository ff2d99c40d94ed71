"""In-memory network of DhtNodes on simulated time, for the DHT acceptance tests and benchmark.

RPCs are synchronous function calls; a dead node's calls fail at once
(as a refused connection would), and every outcome is reported to the DhtNode exactly as
the gRPC service reports it.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from services.discovery.kademlia import (
    Contact,
    DhtConfig,
    DhtNode,
    Lookup,
    dht_key,
    random_node_id,
)

DISCOVERY_PORT = 5001
REGISTRY_PORT = 6443


@dataclass(frozen=True, slots=True)
class ProviderAnswer:
    """Outcome of one provider lookup."""

    providers: list[Contact]
    hops: int
    queries: int


class SimNetwork:
    """N simulated nodes, one clock, deterministic from `seed`."""

    def __init__(self, config: DhtConfig | None = None, *, seed: int = 0) -> None:
        self.config = config or DhtConfig()
        self.rng = random.Random(seed)
        self.now = 0.0
        self.nodes: dict[bytes, DhtNode] = {}
        self.alive: set[bytes] = set()
        self.rpcs = 0
        self._pings: deque[tuple[DhtNode, Contact]] = deque()

    # -- membership -------------------------------------------------------------------

    def add_node(self) -> DhtNode:
        """A new node, not yet joined (knows nobody)."""
        index = len(self.nodes) + 1
        address = f"10.{(index >> 16) & 255}.{(index >> 8) & 255}.{index & 255}"
        me = Contact(random_node_id(self.rng), address, DISCOVERY_PORT, REGISTRY_PORT)
        node = DhtNode(me, self.config, now=self.now, rng=random.Random(self.rng.getrandbits(64)))
        self.nodes[me.node_id] = node
        self.alive.add(me.node_id)
        return node

    def join(self, node: DhtNode, bootstrap: Contact) -> Lookup:
        """Bootstrap as the service does: ping the bootstrap address, look up our own ID,
        then refresh the farther buckets."""
        self.ping(node, bootstrap)
        lookup = self.lookup(node, node.node_id)
        for target in node.join_refresh(self.now):
            self.lookup(node, target)
        self._drain_pings()
        return lookup

    def grow(self, count: int) -> list[DhtNode]:
        """Adds `count` nodes one after another, each joining through the first node."""
        first = next(iter(self.nodes.values()), None)
        added: list[DhtNode] = []
        for _ in range(count):
            node = self.add_node()
            if first is None:
                first = node
            else:
                self.join(node, first.me)
            added.append(node)
        return added

    def kill(self, node_id: bytes) -> None:
        """The node crashes: it stops answering and stops doing anything."""
        self.alive.discard(node_id)

    def live_nodes(self) -> list[DhtNode]:
        """Nodes still running."""
        return [n for nid, n in self.nodes.items() if nid in self.alive]

    # -- RPCs -------------------------------------------------------------------------

    def ping(self, caller: DhtNode, contact: Contact) -> bool:
        """Ping; True when the callee answered."""
        callee = self._reach(caller, contact)
        if callee is None:
            return False
        self._heard(caller, callee.me)
        return True

    def lookup(
        self,
        node: DhtNode,
        target: bytes,
        *,
        find_providers: bool = False,
        provider_limit: int | None = None,
    ) -> Lookup:
        """Runs an iterative lookup to completion, alpha queries per round."""
        lookup = node.start_lookup(
            target, self.now, find_providers=find_providers, provider_limit=provider_limit
        )
        while not lookup.done:
            queries = lookup.next_queries()
            if not queries:
                break
            for contact in queries:
                if find_providers and lookup.done:
                    break  # limit reached: the driver cancels the calls still in flight
                callee = self._reach(node, contact)
                if callee is None:
                    lookup.on_failure(contact)
                    continue
                if find_providers:
                    records, closer = callee.get_providers(
                        node.node_id, target, provider_limit or 0, self.now
                    )
                    self._heard(node, callee.me)
                    lookup.on_response(contact, closer, [r.provider for r in records])
                else:
                    closer = callee.find_node(node.node_id, target)
                    self._heard(node, callee.me)
                    lookup.on_response(contact, closer)
            self._drain_pings()
        return lookup

    def publish(self, node: DhtNode, keys: Iterable[bytes]) -> int:
        """Stores `node`'s records for `keys` at the k closest nodes found by lookup;
        returns how many AddProvider calls succeeded."""
        stored = 0
        for key in keys:
            for contact in self.lookup(node, key).result():
                callee = self._reach(node, contact)
                if callee is None:
                    continue
                callee.add_provider(node.me, [key], self.config.record_ttl, self.now)
                self._heard(node, callee.me)
                stored += 1
        self._drain_pings()
        return stored

    def advertise(self, node: DhtNode, names: Iterable[str]) -> None:
        """Local Advertise followed by the publish the service does in the background."""
        node.advertised.add(names, self.now)
        self.publish(node, [a.key for a in node.advertised.take_due(self.now)])

    def withdraw(self, node: DhtNode, names: Iterable[str]) -> None:
        """Local Withdraw: RemoveProvider to the k closest nodes of each key."""
        for item in node.advertised.remove(names):
            for contact in self.lookup(node, item.key).result():
                callee = self._reach(node, contact)
                if callee is None:
                    continue
                callee.remove_provider(node.me, [item.key])
                self._heard(node, callee.me)
        self._drain_pings()

    def find_providers(self, node: DhtNode, name: str, limit: int | None = None) -> ProviderAnswer:
        """Local FindProviders (no cache): a provider lookup of the key string."""
        lookup = self.lookup(node, dht_key(name), find_providers=True, provider_limit=limit)
        return ProviderAnswer(lookup.providers, lookup.hops, lookup.queries_sent)

    # -- time -------------------------------------------------------------------------

    def advance(self, seconds: float, tick: float) -> None:
        """Moves the clock on in `tick` steps, running every live node's maintenance."""
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + tick)
            for node in self.live_nodes():
                self._maintain(node)

    def _maintain(self, node: DhtNode) -> None:
        work = node.maintenance(self.now)
        for contact in work.probes:
            self.ping(node, contact)
        for target in work.refresh:
            self.lookup(node, target)
        if work.republish:
            self.publish(node, [a.key for a in work.republish])
        self._drain_pings()

    # -- internals --------------------------------------------------------------------

    def _reach(self, caller: DhtNode, contact: Contact) -> DhtNode | None:
        """Delivers a request: the callee learns the caller, or the caller learns of a failure."""
        self.rpcs += 1
        if contact.node_id not in self.alive:
            caller.rpc_failed(contact.node_id, self.now)
            return None
        callee = self.nodes[contact.node_id]
        self._heard(callee, caller.me)
        return callee

    def _heard(self, node: DhtNode, contact: Contact) -> None:
        to_ping = node.heard_from(contact, self.now)
        if to_ping is not None:
            self._pings.append((node, to_ping))

    def _drain_pings(self) -> None:
        """Runs the ping-before-evict checks requested meanwhile (they may request more)."""
        while self._pings:
            node, contact = self._pings.popleft()
            if node.node_id in self.alive:
                self.ping(node, contact)
