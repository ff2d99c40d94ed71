"""DhtNode: request handlers, failure handling, and what a maintenance tick decides."""

from __future__ import annotations

import pytest

from services.discovery.kademlia import DhtConfig, DhtNode, dht_key
from services.discovery.kademlia.node_id import int_id
from tests.unit.discovery.helpers import contact

KEY = dht_key("sha256:" + "22" * 32)
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
