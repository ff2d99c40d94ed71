"""The lease table's rules on an injected clock, and where a key's lease is decided: on a
simulated network every node asks the same node, and the next-closest when that one dies."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from services.common.config import ConfigError, load_config
from services.discovery.kademlia import DhtConfig, DhtNode, dht_key, xor_distance
from services.discovery.kademlia.leases import (
    LeaseCapReached,
    LeaseHeldElsewhere,
    LeaseTable,
    NoLease,
    lease_authorities,
)
from services.discovery.lease_broker import lease_table
from tests.harness.dht_sim import SimNetwork
from tests.unit.discovery.helpers import contact

KEY = dht_key("sha256:" + "ab" * 32)
OTHER_KEY = dht_key("sha256:" + "cd" * 32)
A = contact(1)
B = contact(2)
C = contact(3)


def table(**overrides: float) -> LeaseTable:
    settings: dict[str, float] = {
        "max_leases": 100,
        "max_per_holder": 10,
        "default_ttl": 10.0,
        "max_ttl": 60.0,
    }
    settings.update(overrides)
    return LeaseTable(
        max_leases=int(settings["max_leases"]),
        max_per_holder=int(settings["max_per_holder"]),
        default_ttl=settings["default_ttl"],
        max_ttl=settings["max_ttl"],
    )


def test_first_asker_gets_the_lease_later_askers_are_named_the_holder() -> None:
    leases = table()
    first = leases.acquire(KEY, A, 0, now=100.0)
    assert first.granted and first.lease.holder == A
    assert first.lease.ttl(100.0) == 10.0  # 0 asks for the default
    for asker in (B, C):
        answer = leases.acquire(KEY, asker, 0, now=101.0)
        assert not answer.granted
        assert answer.lease.holder == A
        assert answer.lease.ttl(101.0) == 9.0
    assert leases.counters.granted == 1
    assert leases.counters.waiters == 2


def test_the_holder_learns_how_many_other_nodes_wait() -> None:
    leases = table()
    leases.acquire(KEY, A, 5, now=0.0)
    assert leases.waiters(KEY) == 0
    for asker in (B, C, B, A):  # B asking twice counts once, the holder not at all
        leases.acquire(KEY, asker, 5, now=1.0)
    assert leases.waiters(KEY) == 2
    # A new lease starts with nobody waiting.
    leases.release(KEY, A, now=2.0)
    leases.acquire(KEY, B, 5, now=2.0)
    assert leases.waiters(KEY) == 0
    leases.acquire(KEY, C, 5, now=3.0)
    assert leases.waiters(KEY) == 1
    leases.expire(now=100.0)
    assert leases.waiters(KEY) == 0


D = contact(4)
E = contact(5)


def test_past_its_bound_of_waiters_a_holder_is_joined_by_another() -> None:
    """A blob lease asked for with a bound on waiters: each holder serves at most that many
    other nodes; the next asker past it fetches too, and later askers wait on whichever holder
    has the fewest."""
    leases = table()
    assert leases.acquire(KEY, A, 0, now=0.0, max_waiters=2).granted
    assert [leases.acquire(KEY, n, 0, now=0.0, max_waiters=2).lease.holder for n in (B, C)] == [
        A,
        A,
    ]
    second = leases.acquire(KEY, D, 0, now=0.0, max_waiters=2)
    assert second.granted and second.lease.holder == D
    assert leases.acquire(KEY, E, 0, now=0.0, max_waiters=2).lease.holder == D
    assert (leases.waiters(KEY, A.node_id), leases.waiters(KEY, D.node_id)) == (2, 1)
    assert leases.waiters(KEY) == 3
    assert len(leases) == 2 and leases.counters.granted == 2


def test_an_asker_is_told_the_same_holder_each_time_it_asks() -> None:
    """A waiter asks again while its relay finds nothing yet: that must not make it a holder,
    move it to another holder or count it as a second waiter."""
    leases = table()
    leases.acquire(KEY, A, 0, now=0.0, max_waiters=1)
    assert leases.acquire(KEY, B, 0, now=0.0, max_waiters=1).lease.holder == A
    assert leases.acquire(KEY, C, 0, now=0.0, max_waiters=1).granted
    for _ in range(3):
        again = leases.acquire(KEY, B, 0, now=1.0, max_waiters=1)
        assert not again.granted and again.lease.holder == A
    assert leases.waiters(KEY, A.node_id) == 1


def test_without_a_bound_one_holder_serves_every_asker() -> None:
    leases = table()
    leases.acquire(KEY, A, 0, now=0.0)
    for asker in (B, C, D, E):
        assert leases.acquire(KEY, asker, 0, now=0.0, max_waiters=0).lease.holder == A
    assert len(leases) == 1 and leases.waiters(KEY, A.node_id) == 4


def test_each_holder_of_a_key_renews_releases_and_expires_alone() -> None:
    leases = table()
    leases.acquire(KEY, A, 5, now=0.0, max_waiters=1)
    leases.acquire(KEY, B, 5, now=0.0, max_waiters=1)
    leases.acquire(KEY, C, 5, now=0.0, max_waiters=1)
    assert leases.acquire(KEY, D, 5, now=0.0, max_waiters=1).lease.holder == C
    assert leases.renew(KEY, C, 30, now=1.0).holder == C
    with pytest.raises(LeaseHeldElsewhere):
        leases.renew(KEY, D, 5, now=1.0)
    assert leases.release(KEY, A, now=2.0)
    oldest = leases.get(KEY, now=2.0)
    assert oldest is not None and oldest.holder == C
    # A's waiter lost its holder: it is sent to one with room or fetches itself.
    assert leases.acquire(KEY, B, 5, now=2.0, max_waiters=1).granted
    assert [lease.holder for lease in leases.expire(now=10.0)] == [B]
    assert leases.lease_of(KEY, C.node_id, now=10.0) is not None
    assert leases.held_by(C.node_id) == 1 and len(leases) == 1


def test_a_node_id_holding_a_lease_is_never_given_a_second_one() -> None:
    leases = table()
    leases.acquire(KEY, A, 0, now=0.0, max_waiters=1)
    leases.acquire(KEY, B, 0, now=0.0, max_waiters=1)
    impostor = contact(1, address="10.9.9.9")
    answer = leases.acquire(KEY, impostor, 0, now=0.0, max_waiters=1)
    assert not answer.granted and answer.lease.holder == A
    assert len(leases) == 1


def test_the_holder_asking_again_keeps_its_lease_with_a_fresh_ttl() -> None:
    leases = table()
    leases.acquire(KEY, A, 5, now=0.0)
    again = leases.acquire(KEY, A, 5, now=4.0)
    assert again.granted and again.lease.expires_at == 9.0
    assert leases.counters.granted == 1
    assert len(leases) == 1


def test_a_lease_expires_unless_renewed_and_the_next_asker_gets_it() -> None:
    leases = table()
    leases.acquire(KEY, A, 5, now=0.0)
    assert leases.renew(KEY, A, 5, now=4.0).expires_at == 9.0
    assert not leases.acquire(KEY, B, 5, now=8.9).granted
    assert leases.get(KEY, now=8.9) is not None
    taken = leases.acquire(KEY, B, 5, now=9.0)
    assert taken.granted and taken.lease.holder == B
    assert leases.counters.expired == 1
    assert leases.counters.renewed == 1


def test_expire_drops_only_leases_past_their_time() -> None:
    leases = table()
    leases.acquire(KEY, A, 5, now=0.0)
    leases.acquire(OTHER_KEY, B, 20, now=0.0)
    leases.renew(KEY, A, 30, now=1.0)  # the old expiry entry is outdated, not acted on
    assert leases.expire(now=10.0) == []
    gone = leases.expire(now=25.0)
    assert [lease.holder for lease in gone] == [B]
    assert leases.get(KEY, now=25.0) is not None
    assert len(leases) == 1
    assert leases.held_by(B.node_id) == 0


def test_only_the_holder_renews_or_releases() -> None:
    leases = table()
    leases.acquire(KEY, A, 0, now=0.0)
    with pytest.raises(LeaseHeldElsewhere) as refused:
        leases.renew(KEY, B, 0, now=1.0)
    assert refused.value.lease.holder == A
    with pytest.raises(LeaseHeldElsewhere):
        leases.release(KEY, B, now=1.0)
    # Same node ID calling from another address is not the holder either.
    impostor = contact(1, address="10.9.9.9")
    with pytest.raises(LeaseHeldElsewhere):
        leases.release(KEY, impostor, now=1.0)
    assert leases.get(KEY, now=1.0) is not None


def test_release_frees_the_lease_at_once() -> None:
    leases = table()
    leases.acquire(KEY, A, 0, now=0.0)
    assert leases.release(KEY, A, now=1.0)
    assert leases.acquire(KEY, B, 0, now=1.0).granted
    assert not leases.release(OTHER_KEY, A, now=1.0)
    assert leases.counters.released == 1


def test_renewing_a_lease_nobody_holds_is_no_lease() -> None:
    leases = table()
    with pytest.raises(NoLease):
        leases.renew(KEY, A, 0, now=0.0)
    leases.acquire(KEY, A, 1, now=0.0)
    with pytest.raises(NoLease):
        leases.renew(KEY, A, 1, now=2.0)


def test_ttl_is_cut_to_the_maximum() -> None:
    leases = table(max_ttl=30.0)
    assert leases.acquire(KEY, A, 3600, now=0.0).lease.ttl(0.0) == 30.0


def test_the_table_and_each_holder_are_bounded() -> None:
    leases = table(max_leases=3, max_per_holder=2)
    keys = [dht_key(f"sha256:{i:064x}") for i in range(4)]
    leases.acquire(keys[0], A, 0, now=0.0)
    leases.acquire(keys[1], A, 0, now=0.0)
    with pytest.raises(LeaseCapReached, match="per node"):
        leases.acquire(keys[2], A, 0, now=0.0)
    leases.acquire(keys[2], B, 0, now=0.0)
    with pytest.raises(LeaseCapReached, match="at most 3"):
        leases.acquire(keys[3], C, 0, now=0.0)
    # A full table still answers who holds what, and frees room as leases expire.
    assert leases.acquire(keys[0], C, 0, now=1.0).lease.holder == A
    assert leases.acquire(keys[3], C, 0, now=11.0).granted
    assert leases.counters.refused_cap == 2


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        LeaseTable(max_leases=0, max_per_holder=1, default_ttl=1.0, max_ttl=1.0)
    with pytest.raises(ValueError):
        LeaseTable(max_leases=1, max_per_holder=1, default_ttl=5.0, max_ttl=1.0)


def test_authorities_are_this_node_and_the_found_nodes_closest_first() -> None:
    found = [contact(v) for v in (9, 2, 7, 2)]
    me = contact(5)
    ordered = lease_authorities(KEY, me, found)
    assert len(ordered) == 4  # duplicates collapse, this node counts once
    distances = [xor_distance(c.node_id, KEY) for c in ordered]
    assert distances == sorted(distances)
    assert me in ordered


# -- placement on a simulated network -------------------------------------------------------


def _decider(net: SimNetwork, asker: DhtNode, key: bytes) -> DhtNode:
    """Who decides for `asker`: the first candidate, closest first, that answers."""
    found = net.lookup(asker, key).result()
    for candidate in lease_authorities(key, asker.me, found):
        if candidate.node_id in net.alive:
            return net.nodes[candidate.node_id]
    raise AssertionError("nobody answered")


def test_every_node_asks_the_same_node_and_the_next_closest_when_it_dies() -> None:
    net = SimNetwork(DhtConfig(), seed=7)
    net.grow(120)
    rng = random.Random(8)
    tables = {
        node_id: LeaseTable(max_leases=100, max_per_holder=100, default_ttl=10, max_ttl=60)
        for node_id in net.nodes
    }
    for i in range(10):
        key = dht_key(f"sha256:{i:064x}")
        live = net.live_nodes()
        truly_closest = min(live, key=lambda n: xor_distance(n.node_id, key))
        askers = rng.sample(live, 8)
        deciders = {_decider(net, asker, key).node_id for asker in askers}
        assert deciders == {truly_closest.node_id}
        grants = [
            tables[truly_closest.node_id].acquire(key, asker.me, 0, net.now) for asker in askers
        ]
        assert sum(g.granted for g in grants) == 1
        assert {g.lease.holder for g in grants} == {askers[0].me}

        # The deciding node crashes: the next-closest takes over, knowing no lease (the
        # documented extra fetch during churn), and every asker agrees on it.
        net.kill(truly_closest.node_id)
        next_closest = min(net.live_nodes(), key=lambda n: xor_distance(n.node_id, key))
        later = [a for a in rng.sample(net.live_nodes(), 6)]
        assert {_decider(net, asker, key).node_id for asker in later} == {next_closest.node_id}
        regrant = tables[next_closest.node_id].acquire(key, later[0].me, 0, net.now)
        assert regrant.granted


def test_config_keys_set_the_lease_table(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(
        "discovery:\n  lease_ttl: 90\n  max_lease_ttl: 60\n  max_leases: 5\n"
        "  max_leases_per_peer: 3\n"
    )
    table = lease_table(load_config(path, env={}).discovery)
    # The maximum is never below the default.
    assert (table.default_ttl, table.max_ttl, table.max_leases, table.max_per_holder) == (
        90.0,
        90.0,
        5,
        3,
    )
    path.write_text("discovery:\n  lease_ttl: 0\n")
    with pytest.raises(ConfigError, match=f"{path}: discovery.lease_ttl: must be > 0"):
        load_config(path, env={})
