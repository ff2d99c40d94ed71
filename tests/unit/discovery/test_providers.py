"""Provider records (expiry, removal, liveness) and the republish schedule of our own keys."""

from __future__ import annotations

import pytest

from services.discovery.kademlia import AdvertisedKeys, ProviderStore, dht_key
from tests.unit.discovery.helpers import contact

KEY = dht_key("sha256:" + "11" * 32)
OTHER = dht_key("docker.io/library/alpine:3.20")


def test_records_expire_after_their_ttl() -> None:
    store = ProviderStore(max_ttl=600)
    p = contact(1)
    assert store.add(KEY, p, ttl=60, now=0.0) == 60
    [record] = store.get(KEY, now=59.0)
    assert record.provider == p
    assert record.ttl(now=50.0) == 10
    assert store.get(KEY, now=60.0) == []  # expired records are never served
    assert store.expire(now=59.0) == 0
    assert len(store) == 1
    assert store.expire(now=60.0) == 1
    assert len(store) == 0
    assert store.keys() == []


def test_refresh_extends_and_old_expiry_entry_is_ignored() -> None:
    store = ProviderStore()
    p = contact(1)
    store.add(KEY, p, ttl=60, now=0.0)
    store.add(KEY, p, ttl=60, now=50.0)
    assert store.expire(now=70.0) == 0
    assert len(store.get(KEY, now=70.0)) == 1
    assert store.expire(now=110.0) == 1


def test_ttl_is_capped() -> None:
    store = ProviderStore(max_ttl=100)
    assert store.add(KEY, contact(1), ttl=1e6, now=0.0) == 100
    assert store.get(KEY, now=0.0)[0].expires_at == 100


def test_freshest_first_limit_and_exclude() -> None:
    store = ProviderStore()
    a, b, c = contact(1), contact(2), contact(3)
    store.add(KEY, a, 100, now=0.0)
    store.add(KEY, b, 100, now=10.0)
    store.add(KEY, c, 100, now=5.0)
    assert [r.provider for r in store.get(KEY, now=20.0)] == [b, c, a]
    assert [r.provider for r in store.get(KEY, now=20.0, limit=2)] == [b, c]
    assert [r.provider for r in store.get(KEY, now=20.0, exclude=b.node_id)] == [c, a]


def test_remove_needs_the_recorded_address() -> None:
    store = ProviderStore()
    p = contact(1, address="10.0.0.1")
    store.add(KEY, p, 100, now=0.0)
    assert not store.remove(KEY, p.node_id, address="10.9.9.9")
    assert store.remove(KEY, p.node_id, address="10.0.0.1")
    assert store.get(KEY, now=1.0) == []
    assert not store.remove(KEY, p.node_id)


def test_remove_node_drops_all_its_records() -> None:
    store = ProviderStore()
    dead, live = contact(1), contact(2)
    for key in (KEY, OTHER):
        store.add(key, dead, 100, now=0.0)
    store.add(KEY, live, 100, now=0.0)
    assert store.remove_node(dead.node_id) == 2
    assert [r.provider for r in store.get(KEY, now=1.0)] == [live]
    assert store.get(OTHER, now=1.0) == []
    assert len(store) == 1
    assert store.remove_node(dead.node_id) == 0


def test_provider_liveness_tracking() -> None:
    store = ProviderStore()
    quiet, chatty = contact(1), contact(2)
    store.add(KEY, quiet, 600, now=0.0)
    store.add(KEY, chatty, 600, now=0.0)
    store.heard_from(chatty.node_id, 15.0)
    store.heard_from(contact(3).node_id, 15.0)  # not a provider: not tracked
    assert store.probe_due(now=20.0, idle=10.0) == [quiet]
    assert store.silent(now=31.0, window=30.0) == [quiet.node_id]
    assert store.last_seen(contact(3).node_id) is None


def test_new_keys_are_due_at_once_then_every_interval() -> None:
    keys = AdvertisedKeys(republish_interval=120)
    assert keys.add(["a", "b", "a"], now=0.0) == 2
    assert keys.add(["b"], now=1.0) == 0
    assert len(keys) == 2 and "a" in keys
    due = keys.take_due(now=0.0)
    assert {d.name for d in due} == {"a", "b"}
    assert {d.key for d in due} == {dht_key("a"), dht_key("b")}
    assert keys.take_due(now=119.0) == []
    assert keys.next_due() == 120.0
    assert {d.name for d in keys.take_due(now=120.0, limit=1)} <= {"a", "b"}
    assert len(keys.take_due(now=120.0)) == 1  # the other one


def test_withdrawn_keys_are_not_republished() -> None:
    keys = AdvertisedKeys(republish_interval=120)
    keys.add(["a", "b"], now=0.0)
    removed = keys.remove(["a", "zzz"])
    assert [(r.name, r.key) for r in removed] == [("a", dht_key("a"))]
    assert [d.name for d in keys.take_due(now=0.0)] == ["b"]
    assert list(keys) == ["b"]


def test_failed_publish_can_be_retried_sooner() -> None:
    keys = AdvertisedKeys(republish_interval=120)
    keys.add(["a"], now=0.0)
    keys.take_due(now=0.0)
    keys.retry(["a"], at=10.0)
    keys.retry(["a"], at=50.0)  # later than planned: ignored
    assert keys.next_due() == 10.0
    assert [d.name for d in keys.take_due(now=10.0)] == ["a"]
    assert keys.next_due() == 130.0


def test_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError):
        AdvertisedKeys(0)
    with pytest.raises(ValueError):
        ProviderStore(max_ttl=0)


def test_records_per_provider_are_capped_and_refreshes_still_count() -> None:
    store = ProviderStore(max_per_provider=3, max_total=100)
    p, q = contact(1), contact(2)
    keys = [dht_key(str(i)) for i in range(5)]
    assert [store.add(k, p, ttl=60, now=0.0) for k in keys] == [60, 60, 60, 0.0, 0.0]
    assert len(store) == 3
    # Refreshing a record it has is not a new record: allowed at the cap.
    assert store.add(keys[0], p, ttl=60, now=10.0) == 60
    # Another provider has its own allowance.
    assert store.add(keys[4], q, ttl=60, now=0.0) == 60
    assert len(store) == 4


def test_at_the_total_cap_the_largest_provider_makes_room() -> None:
    store = ProviderStore(max_per_provider=10, max_total=6)
    flooder, small, other = contact(1), contact(2), contact(3)
    for i in range(6):
        store.add(dht_key(f"flood-{i}"), flooder, ttl=60, now=0.0)
    assert len(store) == 6
    # A provider with fewer records takes the room of the one holding the most ...
    assert store.add(KEY, small, ttl=60, now=0.0) == 60
    assert store.add(OTHER, other, ttl=60, now=0.0) == 60
    assert len(store) == 6
    assert [r.provider for r in store.get(KEY, now=1.0)] == [small]
    # ... but the largest one cannot push others out to grow further.
    assert store.add(dht_key("flood-new"), flooder, ttl=60, now=0.0) == 0.0
    assert len(store) == 6
    assert len(store.get(OTHER, now=1.0)) == 1


def test_expiry_entries_stay_bounded_under_refreshes() -> None:
    store = ProviderStore(max_ttl=600)
    p = contact(1)
    for second in range(10_000):
        store.add(KEY, p, ttl=600, now=float(second))
    assert len(store) == 1
    assert store.pending_expiries() <= 2 * len(store) + 64
    assert store.expire(now=10_000.0 + 599) == 1
    assert store.pending_expiries() == 0


def test_probe_due_names_each_provider_once_at_its_latest_address() -> None:
    store = ProviderStore()
    store.add(KEY, contact(1, address="10.0.0.1"), ttl=60, now=0.0)
    store.add(OTHER, contact(1, address="10.0.0.9"), ttl=60, now=1.0)
    assert [c.address for c in store.probe_due(now=20.0, idle=10.0)] == ["10.0.0.9"]
