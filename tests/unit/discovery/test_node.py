"""DhtNode: request handlers, failure handling, and what a maintenance tick decides."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.config import ConfigError, DiscoverySection, NodeConfig
from services.discovery.kademlia import DhtConfig, DhtNode, RecordRateExceeded, dht_key
from services.discovery.kademlia.node_id import int_id
from services.discovery.service import dht_config
from tests.unit.discovery.helpers import contact

KEY = dht_key("sha256:" + "22" * 32)
OTHER = dht_key("docker.io/library/alpine:3.20")
CFG = DhtConfig(k=4, max_failures=2, probe_interval=10, probe_timeout=2, liveness_window=30)


def node() -> DhtNode:
    return DhtNode(contact(1 << 255), CFG)


def test_add_provider_stores_the_sender_with_default_and_capped_ttl() -> None:
    n = node()
    sender = contact(7, address="10.1.1.1")
    assert n.add_provider(sender, [KEY, b"short"], ttl=0, now=0.0) == (1, CFG.record_ttl)
    assert n.add_provider(sender, [KEY], ttl=1e9, now=0.0) == (1, CFG.max_record_ttl)
    providers, _ = n.get_providers(contact(9).node_id, KEY, limit=0, now=1.0)
    assert [p.provider for p in providers] == [sender]


def test_add_provider_caps_the_batch() -> None:
    n = DhtNode(contact(1), DhtConfig(max_batch_keys=3))
    keys = [dht_key(str(i)) for i in range(5)]
    assert n.add_provider(contact(2), keys, ttl=60, now=0.0)[0] == 3
    assert len(n.store) == 3


def test_remove_provider_only_for_the_same_address() -> None:
    n = node()
    sender = contact(7, address="10.1.1.1")
    n.add_provider(sender, [KEY], ttl=60, now=0.0)
    impostor = contact(7, address="10.6.6.6")
    assert n.remove_provider(impostor, [KEY]) == 0
    assert n.remove_provider(sender, [KEY, dht_key("other")]) == 1
    assert n.get_providers(contact(9).node_id, KEY, 0, 1.0)[0] == []


def test_find_node_never_returns_the_caller() -> None:
    n = node()
    for v in range(2, 8):
        n.heard_from(contact(v), 0.0)
    closest = n.find_node(contact(2).node_id, int_id(2))
    assert contact(2).node_id in n.table
    assert contact(2).node_id not in {c.node_id for c in closest}
    assert len(closest) == len(n.table) - 1


def test_node_failing_repeatedly_is_dropped_with_its_records() -> None:
    n = node()
    peer = contact(7)
    n.heard_from(peer, 0.0)
    n.add_provider(peer, [KEY], ttl=600, now=0.0)
    assert not n.rpc_failed(peer.node_id, 1.0)
    n.heard_from(peer, 2.0)  # answering resets the count
    assert not n.rpc_failed(peer.node_id, 3.0)
    assert n.rpc_failed(peer.node_id, 4.0)
    assert peer.node_id not in n.table
    assert n.get_providers(contact(9).node_id, KEY, 0, 5.0)[0] == []


def test_provider_outside_the_routing_table_is_also_dropped_when_dead() -> None:
    n = node()
    provider = contact(7)
    n.add_provider(provider, [KEY], ttl=600, now=0.0)
    assert provider.node_id not in n.table  # AddProvider alone does not insert it
    n.rpc_failed(provider.node_id, 1.0)
    assert n.rpc_failed(provider.node_id, 2.0)
    assert len(n.store) == 0


def test_heard_from_full_bucket_asks_for_a_ping() -> None:
    n = DhtNode(contact(0), DhtConfig(k=2))
    far = [contact((1 << 255) | i) for i in range(3)]
    assert n.heard_from(far[0], 0.0) is None
    assert n.heard_from(far[1], 1.0) is None
    n.heard_from(contact(5), 1.5)  # split the table so the far bucket stops splitting
    assert n.heard_from(far[2], 2.0) == far[0]
    assert n.rpc_failed(far[0].node_id, 3.0)  # failed eviction ping: slot goes to far[2]
    assert far[2].node_id in n.table


def test_maintenance_probes_silent_nodes_once_per_timeout() -> None:
    n = node()
    quiet, chatty = contact(7), contact(8)
    n.heard_from(quiet, 0.0)
    n.heard_from(chatty, 0.0)
    n.heard_from(chatty, 9.0)
    assert n.maintenance(10.0).probes == [quiet]
    assert n.maintenance(11.0).probes == []  # probe in flight
    assert n.maintenance(12.0).probes == [quiet]  # unanswered past probe_timeout: resend
    assert not n.rpc_failed(quiet.node_id, 12.5)
    assert n.maintenance(13.0).probes == [quiet]  # one failure: ask again at once
    assert n.rpc_failed(quiet.node_id, 13.5)  # second failure: dead
    assert n.maintenance(14.0).probes == []
    assert quiet.node_id not in n.table


def test_maintenance_probes_providers_and_drops_silent_ones() -> None:
    n = node()
    provider = contact(7)
    n.add_provider(provider, [KEY], ttl=600, now=0.0)
    assert n.maintenance(10.0).probes == [provider]
    work = n.maintenance(31.0)
    assert work.dropped == [provider.node_id]
    assert len(n.store) == 0


def test_maintenance_expires_records_and_hands_out_republishing() -> None:
    n = node()
    n.add_provider(contact(7), [KEY], ttl=5, now=0.0)
    n.advertised.add(["sha256:" + "33" * 32], now=0.0)
    work = n.maintenance(6.0)
    assert work.expired_records == 1
    assert [a.name for a in work.republish] == ["sha256:" + "33" * 32]
    assert n.maintenance(7.0).republish == []
    assert [a.name for a in n.maintenance(6.0 + CFG.republish_interval).republish] == [
        "sha256:" + "33" * 32
    ]


def test_lookup_is_seeded_from_the_table_and_skips_ourselves() -> None:
    n = node()
    for v in range(2, 10):
        n.heard_from(contact(v), 0.0)
    lookup = n.start_lookup(int_id(3), 0.0, find_providers=True, provider_limit=1)
    assert [c.node_id for c in lookup.next_queries()] == [
        c.node_id for c in n.table.closest(int_id(3), 3)
    ]
    assert lookup.on_response(contact(3), [], providers=[n.me]) == []


def test_config_rejects_inconsistent_timings() -> None:
    with pytest.raises(ValueError):
        DhtConfig(probe_interval=30, liveness_window=30)
    with pytest.raises(ValueError):
        DhtConfig(record_ttl=100, republish_interval=100)


def test_a_node_accepts_only_keys_it_is_among_the_k_closest_to() -> None:
    n = node()  # ID 1000...0
    near_zero = [contact(value) for value in (2, 3, 4, 5)]  # k = 4 contacts far from us
    for c in near_zero:
        n.heard_from(c, now=0.0)
    publisher = contact(1 << 254)
    far_from_us = int_id(7)  # all four contacts are closer to it than we are
    near_us = int_id((1 << 255) | 7)
    assert n.add_provider(publisher, [far_from_us, near_us], ttl=60, now=0.0)[0] == 1
    assert n.store.keys() == [near_us]
    # The publisher itself does not count: a contact closer than us that publishes leaves
    # fewer than k others ahead of us.
    assert n.add_provider(near_zero[0], [far_from_us], ttl=60, now=0.0)[0] == 1


def test_a_flood_from_one_peer_stays_within_its_cap_and_others_still_store() -> None:
    cfg = DhtConfig()
    n = DhtNode(contact(1), cfg)
    flooder, honest = contact(2, address="10.6.6.6"), contact(3)
    assert n.add_provider(honest, [KEY], ttl=0, now=0.0)[0] == 1
    stored = 0
    refused = 0
    for call in range(200):
        keys = [dht_key(f"flood-{call}-{i}") for i in range(cfg.max_batch_keys)]
        try:
            stored += n.add_provider(flooder, keys, ttl=0, now=call / 10)[0]
        except RecordRateExceeded:
            refused += 1
    assert stored == cfg.max_records_per_peer
    assert refused > 0
    assert len(n.store) == cfg.max_records_per_peer + 1
    assert n.store.pending_expiries() <= 2 * len(n.store) + 64
    assert n.add_provider(honest, [OTHER], ttl=0, now=30.0)[0] == 1
    providers, _ = n.get_providers(contact(9).node_id, KEY, limit=0, now=30.0)
    assert [p.provider for p in providers] == [honest]


def test_records_a_peer_may_store_per_second_are_limited() -> None:
    cfg = DhtConfig(max_records_per_peer=100, peer_records_per_second=10.0, max_batch_keys=60)
    n = DhtNode(contact(1), cfg)
    peer = contact(2)
    keys = [dht_key(str(i)) for i in range(60)]
    assert n.add_provider(peer, keys, ttl=60, now=0.0)[0] == 60  # within the burst
    with pytest.raises(RecordRateExceeded) as err:
        n.add_provider(peer, keys, ttl=60, now=1.0)  # 40 + 10 tokens left
    assert err.value.retry_after == pytest.approx(1.0)
    # A refused call stores nothing and spends nothing; another peer is not affected.
    assert n.add_provider(contact(3), keys, ttl=60, now=1.0)[0] == 60
    assert n.add_provider(peer, keys, ttl=60, now=2.0)[0] == 60


def test_config_rejects_caps_that_cannot_work() -> None:
    with pytest.raises(ValueError, match="max_records_per_peer"):
        DhtConfig(max_records_per_peer=2000, max_records_total=1000)
    with pytest.raises(ValueError, match="peer_records_per_second"):
        DhtConfig(peer_records_per_second=0)


def test_the_service_passes_record_bounds_to_the_core_and_names_bad_ones() -> None:
    section = DiscoverySection(
        max_records_per_peer=7, max_records_total=9, peer_records_per_second=3.0
    )
    cfg = dht_config(NodeConfig(discovery=section))
    assert (cfg.max_records_per_peer, cfg.max_records_total, cfg.peer_records_per_second) == (
        7,
        9,
        3.0,
    )
    bad = DiscoverySection(max_records_per_peer=10, max_records_total=5)
    with pytest.raises(ConfigError, match=r"^discovery: max_records_per_peer"):
        dht_config(NodeConfig(discovery=bad))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), contacts=st.integers(0, 120))
def test_responsibility_matches_counting_every_closer_contact(seed: int, contacts: int) -> None:
    rng = random.Random(seed)
    n = DhtNode(contact(rng.getrandbits(256)), CFG)
    for _ in range(contacts):
        n.heard_from(contact(rng.getrandbits(256)), now=0.0)
    known = list(n.table)
    for _ in range(20):
        key = int_id(rng.getrandbits(256))
        publisher = rng.choice(known).node_id if known and rng.random() < 0.5 else bytes(32)
        own = n.me.key ^ int.from_bytes(key, "big")
        closer = [
            c for c in known if c.key ^ int.from_bytes(key, "big") < own and c.node_id != publisher
        ]
        assert n.responsible(key, publisher) == (len(closer) < CFG.k)


def test_budgets_of_quiet_peers_are_forgotten_by_maintenance() -> None:
    cfg = DhtConfig(max_records_per_peer=100, peer_records_per_second=10.0, max_batch_keys=50)
    n = DhtNode(contact(1), cfg)
    n.add_provider(contact(2), [dht_key(str(i)) for i in range(50)], ttl=60, now=0.0)
    n.maintenance(now=1.0)
    assert len(n.budgets) == 1  # 60 of 100 tokens: still spent
    n.maintenance(now=5.0)
    assert len(n.budgets) == 0  # full again: nothing to remember
