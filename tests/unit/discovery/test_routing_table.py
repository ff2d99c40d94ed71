"""Routing table: bucket splitting, LRS order, ping-before-evict, failures, liveness, closest."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.discovery.kademlia import ID_BITS, AddStatus, RoutingTable
from services.discovery.kademlia.node_id import common_prefix_length, id_int, int_id
from tests.unit.discovery.helpers import contact, with_prefix

OWN = 0x5A << (ID_BITS - 8)  # 0101 1010 ...
K = 4


def table(max_failures: int = 2, ping_timeout: float = 10.0) -> RoutingTable:
    return RoutingTable(int_id(OWN), k=K, max_failures=max_failures, ping_timeout=ping_timeout)


def fill_far_bucket(rt: RoutingTable, now: float = 0.0) -> list[int]:
    """K contacts sharing no bit with OWN (bucket 0 after the first split)."""
    ids = [with_prefix(OWN, 0, i) for i in range(K)]
    for i, value in enumerate(ids):
        assert rt.add(contact(value), now + i).status is AddStatus.ADDED
    return ids


def test_own_id_is_never_stored() -> None:
    rt = table()
    assert rt.add(contact(OWN), 0).status is AddStatus.IGNORED
    assert len(rt) == 0


def test_seen_again_moves_to_tail_least_recently_seen_first() -> None:
    rt = table()
    ids = [with_prefix(OWN, 0, i) for i in range(3)]
    for i, value in enumerate(ids):
        rt.add(contact(value), float(i))
    assert rt.add(contact(ids[0]), 10.0).status is AddStatus.UPDATED
    assert [id_int(c.node_id) for c in rt.bucket_contacts(0)] == [ids[1], ids[2], ids[0]]


def test_only_our_own_range_splits() -> None:
    rt = table()
    far = fill_far_bucket(rt)
    assert rt.bucket_count == 1  # K contacts fit in the single bucket
    # One more contact close to us: the full bucket covers our range, so it splits.
    near = with_prefix(OWN, 3, 1)
    assert rt.add(contact(near), 10.0).status is AddStatus.ADDED
    assert rt.bucket_count >= 2
    assert {id_int(c.node_id) for c in rt.bucket_contacts(0)} == set(far)
    assert near in {id_int(c.node_id) for c in rt}
    # The far bucket (bucket 0) no longer covers our ID: a newcomer there must not split it.
    before = rt.bucket_count
    result = rt.add(contact(with_prefix(OWN, 0, 99)), 11.0)
    assert result.status is AddStatus.PING
    assert rt.bucket_count == before
    assert len(rt) == K + 1


def test_splitting_puts_every_contact_in_the_bucket_of_its_prefix() -> None:
    rt = table()
    rng = random.Random(3)
    added = set()
    for shared in range(12):
        for _ in range(K):
            value = with_prefix(OWN, shared, rng.getrandbits(ID_BITS))
            if rt.add(contact(value), 0.0).status is AddStatus.ADDED:
                added.add(value)
    # Every prefix length 0..11 got K contacts: the table split into 12 buckets (the
    # last, our own range, just fits the K sharing 11 bits) and nothing was evicted.
    assert rt.bucket_count == 12
    assert len(rt) == len(added) == 12 * K
    last = rt.bucket_count - 1
    for index in range(rt.bucket_count):
        for c in rt.bucket_contacts(index):
            cpl = common_prefix_length(c.node_id, int_id(OWN))
            assert min(cpl, last) == index


def test_full_bucket_ping_answered_keeps_old_contact_and_drops_newcomer() -> None:
    rt = table()
    rt.add(contact(with_prefix(OWN, 5, 0)), 0.0)  # forces a split so bucket 0 is "far"
    far = fill_far_bucket(rt, now=1.0)
    newcomer = contact(with_prefix(OWN, 0, 1000))
    result = rt.add(newcomer, 20.0)
    assert result.status is AddStatus.PING
    assert result.ping is not None and id_int(result.ping.node_id) == far[0]  # the LRS
    assert rt.replacements(0) == [newcomer]
    # The LRS answers: it moves to the tail, the newcomer is dropped.
    assert rt.add(result.ping, 21.0).status is AddStatus.UPDATED
    assert [id_int(c.node_id) for c in rt.bucket_contacts(0)] == [*far[1:], far[0]]
    assert newcomer.node_id not in rt
    assert rt.replacements(0) == []


def test_full_bucket_ping_timeout_evicts_lrs_for_newcomer() -> None:
    rt = table()
    rt.add(contact(with_prefix(OWN, 5, 0)), 0.0)
    far = fill_far_bucket(rt, now=1.0)
    newcomer = contact(with_prefix(OWN, 0, 1000))
    result = rt.add(newcomer, 20.0)
    assert result.ping is not None
    # A second newcomer while the ping is in flight only waits in the cache.
    other = contact(with_prefix(OWN, 0, 2000))
    assert rt.add(other, 20.5).status is AddStatus.CACHED
    removed = rt.record_failure(result.ping.node_id, 22.0)
    assert removed == result.ping
    members = [id_int(c.node_id) for c in rt.bucket_contacts(0)]
    assert far[0] not in members
    assert members[-1] == id_int(newcomer.node_id)  # the newcomer that asked gets the slot
    assert rt.replacements(0) == [other]


def test_unreported_ping_is_reissued_after_timeout() -> None:
    rt = table(ping_timeout=5)
    rt.add(contact(with_prefix(OWN, 5, 0)), 0.0)
    fill_far_bucket(rt, now=1.0)
    assert rt.add(contact(with_prefix(OWN, 0, 1000)), 10.0).status is AddStatus.PING
    assert rt.add(contact(with_prefix(OWN, 0, 1001)), 12.0).status is AddStatus.CACHED
    assert rt.add(contact(with_prefix(OWN, 0, 1002)), 16.0).status is AddStatus.PING


def test_consecutive_failures_remove_a_contact_and_promote_a_replacement() -> None:
    rt = table(max_failures=2)
    rt.add(contact(with_prefix(OWN, 5, 0)), 0.0)
    far = fill_far_bucket(rt, now=1.0)
    waiting = contact(with_prefix(OWN, 0, 1000))
    ping = rt.add(waiting, 5.0).ping
    assert ping is not None
    rt.add(ping, 6.0)  # LRS answered; newcomer dropped
    cached = contact(with_prefix(OWN, 0, 2000))
    assert rt.add(cached, 7.0).status is AddStatus.PING  # new ping-before-evict round
    victim = int_id(far[2])
    assert rt.record_failure(victim, 8.0) is None  # one failure is forgiven...
    rt.add(contact(far[2]), 9.0)  # ...and an answer resets the count
    assert rt.record_failure(victim, 10.0) is None
    removed = rt.record_failure(victim, 11.0)
    assert removed is not None and removed.node_id == victim
    assert victim not in rt
    assert cached.node_id in rt  # the replacement took the slot
    assert len(rt.bucket_contacts(0)) == K


def test_failure_of_unknown_node_is_harmless() -> None:
    rt = table()
    assert rt.record_failure(int_id(with_prefix(OWN, 0, 1)), 0.0) is None
    assert rt.remove(int_id(with_prefix(OWN, 0, 1))) is None


def test_probe_due_and_liveness_expiry() -> None:
    rt = table()
    old = contact(with_prefix(OWN, 0, 1))
    fresh = contact(with_prefix(OWN, 1, 1))
    rt.add(old, 0.0)
    rt.add(fresh, 25.0)
    assert rt.probe_due(now=30.0, idle=10.0) == [old]
    assert rt.expire(now=30.0, window=30.0) == []  # silent exactly the window: still in
    assert rt.expire(now=31.0, window=30.0) == [old]
    assert old.node_id not in rt
    assert fresh.node_id in rt


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=(1 << ID_BITS) - 1), min_size=0, max_size=120),
    st.integers(min_value=0, max_value=(1 << ID_BITS) - 1),
    st.integers(min_value=1, max_value=30),
)
def test_closest_matches_brute_force(values: list[int], target: int, n: int) -> None:
    rt = RoutingTable(int_id(OWN), k=8)
    for value in values:
        rt.add(contact(value), 0.0)
    members = [id_int(c.node_id) for c in rt]
    expected = sorted(members, key=lambda v: v ^ target)[:n]
    got = [id_int(c.node_id) for c in rt.closest(int_id(target), n)]
    assert got == expected


def test_closest_excludes_the_caller() -> None:
    rt = table()
    ids = fill_far_bucket(rt)
    got = rt.closest(int_id(ids[0]), 10, exclude=int_id(ids[0]))
    assert int_id(ids[0]) not in {c.node_id for c in got}
    assert len(got) == K - 1


def test_refresh_targets_fall_in_their_buckets() -> None:
    rt = table()
    rng = random.Random(5)
    for shared in range(6):
        for i in range(K):
            rt.add(contact(with_prefix(OWN, shared, i + 1)), 0.0)
    targets = rt.refresh_targets(now=1000.0, interval=600.0, rng=rng)
    assert [rt.bucket_of(t) for t in targets] == list(range(rt.bucket_count))
    # Refreshed buckets are not due again until the interval passes.
    assert rt.refresh_targets(now=1001.0, interval=600.0, rng=rng) == []
    rt.note_lookup(targets[0], 1700.0)
    due = rt.refresh_targets(now=1700.0, interval=600.0, rng=rng, skip_own_range=True)
    assert [rt.bucket_of(t) for t in due] == list(range(1, rt.bucket_count - 1))


def test_peers_are_listed_closest_to_us_first() -> None:
    rt = table()
    values = [with_prefix(OWN, s, 7) for s in (0, 4, 2)]
    for value in values:
        rt.add(contact(value), 3.0)
    listed = [id_int(p.contact.node_id) for p in rt.peers()]
    assert listed == sorted(values, key=lambda v: v ^ OWN)
    assert all(p.last_seen == 3.0 for p in rt.peers())


def test_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError):
        RoutingTable(int_id(OWN), k=0)
