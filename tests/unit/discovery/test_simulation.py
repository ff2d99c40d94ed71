"""Acceptance of the Kademlia core on a simulated 1,000-node network: lookups find
providers in few hops, survive 20% of nodes crashing, forget dead providers within the
liveness window, and stop returning withdrawn keys after one round of removals.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass

import pytest

from services.discovery.kademlia import DhtConfig, DhtNode
from tests.harness.dht_sim import SimNetwork

pytestmark = pytest.mark.slow

NODES = 1000
KEYS = 300
CONFIG = DhtConfig()  # the service defaults: k=20, alpha=3, liveness window 30 s
TICK = 2.0  # simulated seconds between maintenance ticks


@dataclass
class World:
    net: SimNetwork
    holders: dict[str, set[bytes]]  # key string -> node IDs advertising it


def build(seed: int) -> World:
    """NODES nodes joining through one bootstrap node, KEYS keys with 1-3 providers each."""
    net = SimNetwork(CONFIG, seed=seed)
    net.grow(NODES)
    nodes = list(net.nodes.values())
    holders: dict[str, set[bytes]] = {}
    for i in range(KEYS):
        name = f"sha256:{seed:04x}{i:060x}"
        providers = net.rng.sample(nodes, 1 + i % 3)
        for provider in providers:
            net.advertise(provider, [name])
        holders[name] = {p.node_id for p in providers}
    return World(net, holders)


def asker(world: World, rng: random.Random, name: str) -> DhtNode:
    """A random live node that does not itself advertise `name`."""
    while True:
        node = rng.choice(world.net.live_nodes())
        if node.node_id not in world.holders[name]:
            return node


@pytest.fixture(scope="module")
def world() -> World:
    return build(seed=1)


def test_every_advertised_key_is_found_in_few_hops(world: World) -> None:
    rng = random.Random(2)
    hops: list[int] = []
    for name, holders in world.holders.items():
        answer = world.net.find_providers(asker(world, rng, name), name, limit=1)
        assert len(answer.providers) == 1, name
        assert answer.providers[0].node_id in holders
        hops.append(answer.hops)
    assert statistics.median(hops) <= 4
    assert max(hops) <= 8


def test_routing_tables_hold_k_closest_neighbours(world: World) -> None:
    # Each node's table knows its true k closest nodes, which is what makes lookups of
    # nearby keys converge on the same storers wherever they start.
    rng = random.Random(3)
    nodes = list(world.net.nodes.values())
    for node in rng.sample(nodes, 50):
        true_closest = sorted(nodes, key=lambda n: n.me.key ^ node.me.key)[1 : CONFIG.k + 1]
        known = {c.node_id for c in node.table.closest(node.node_id, CONFIG.k)}
        overlap = len(known & {n.node_id for n in true_closest})
        assert overlap >= CONFIG.k - 2


def test_withdrawn_keys_stop_being_returned_after_one_round(world: World) -> None:
    rng = random.Random(4)
    withdrawn: dict[str, bytes] = {}
    for name in rng.sample(sorted(world.holders), 30):
        provider_id = sorted(world.holders[name])[0]
        world.net.withdraw(world.net.nodes[provider_id], [name])
        withdrawn[name] = provider_id
    for name, provider_id in withdrawn.items():
        others = world.holders[name] - {provider_id}
        world.holders[name] = others
        # No limit: the lookup gathers every record the storers hold.
        answer = world.net.find_providers(asker(world, rng, name), name)
        found = {p.node_id for p in answer.providers}
        assert provider_id not in found
        assert found == others


def test_lookups_survive_crashes_and_dead_providers_disappear() -> None:
    world = build(seed=5)
    net = world.net
    rng = random.Random(6)
    for node_id in rng.sample(sorted(net.nodes), NODES // 5):
        net.kill(node_id)

    def survey() -> tuple[int, int, int]:
        """(lookups that found a live provider, lookups of keys with a live holder,
        dead providers named in answers)."""
        found = wanted = dead_named = 0
        for name, holders in world.holders.items():
            answer = net.find_providers(asker(world, rng, name), name)
            named = {p.node_id for p in answer.providers}
            dead_named += len(named - net.alive)
            if holders & net.alive:
                wanted += 1
                found += bool(named & net.alive)
        return found, wanted, dead_named

    # Right after the crash nobody has noticed yet: lookups route around dead nodes.
    found, wanted, dead_named = survey()
    assert wanted > 0.9 * KEYS
    assert found >= 0.99 * wanted
    assert dead_named > 0  # stale records still name crashed providers...

    # ...until the liveness window has passed (each node probing on its maintenance tick).
    net.advance(CONFIG.liveness_window + TICK, tick=TICK)
    found, wanted, dead_named = survey()
    assert found >= 0.99 * wanted
    assert dead_named == 0
    # The survivors' tables forgot the crashed nodes too.
    assert all(c.node_id in net.alive for node in net.live_nodes() for c in node.table)
