"""RejoinSchedule: which configured bootstrap addresses a node with peers pings again, and when."""

from __future__ import annotations

import random

import pytest

from services.discovery.bootstrap import BootstrapEndpoint
from services.discovery.rejoin import RejoinSchedule

ME = b"\x00" * 32
A_ID = b"\x0a" * 32
B_ID = b"\x0b" * 32
A = BootstrapEndpoint("10.0.0.1", 5001)
B = BootstrapEndpoint("10.0.0.2", 5001)
SELF = BootstrapEndpoint("10.0.0.9", 5001)


def schedule(batch: int = 8) -> RejoinSchedule:
    return RejoinSchedule(base=1.0, cap=8.0, recheck=100.0, batch=batch, rng=random.Random(7))


def test_an_absent_address_is_pinged_in_the_first_round_that_sees_it() -> None:
    s = schedule()
    assert s.due([A, B], table_ids={B_ID}, table_endpoints={B}, now=0.0) == [A]


def test_rounds_come_about_every_base_seconds() -> None:
    s = schedule()
    assert s.due([A], set(), set(), now=0.0) == [A]
    s.failed(A, now=0.0)
    assert s.due([A], set(), set(), now=0.5) == []


def test_a_silent_address_backs_off_up_to_the_cap() -> None:
    s = schedule()
    now = 0.0
    gaps: list[float] = []
    last = 0.0
    for _ in range(12):
        while not s.due([A], set(), set(), now):
            now += 0.25
        gaps.append(now - last)
        last = now
        s.failed(A, now)
    assert gaps[2] > gaps[1]
    assert max(gaps) <= 8.0 * 1.2 + 0.25 + 1.2
    assert s.failures(A) == 12


def test_an_address_whose_node_is_in_the_table_is_not_pinged() -> None:
    s = schedule()
    s.answered(A, A_ID, ME, now=0.0)
    # Listed under an address other than the one the contact has: its ID tells.
    assert s.due([A], table_ids={A_ID}, table_endpoints=set(), now=0.0) == []


def test_a_node_dropped_from_the_table_is_pinged_again() -> None:
    s = schedule()
    s.answered(A, A_ID, ME, now=0.0)
    assert s.due([A], table_ids={A_ID}, table_endpoints={A}, now=0.0) == []
    assert s.due([A], table_ids=set(), table_endpoints=set(), now=5.0) == [A]


def test_an_answer_resets_the_streak_and_one_the_table_did_not_take_waits_recheck() -> None:
    s = schedule()
    for now in (0.0, 10.0):
        assert s.due([A], set(), set(), now) == [A]
        s.failed(A, now)
    assert s.failures(A) == 2
    assert s.due([A], set(), set(), 30.0) == [A]
    s.answered(A, A_ID, ME, 30.0)
    assert s.failures(A) == 0
    # The node answered but is not in the table (its bucket is full): not asked again soon.
    assert s.due([A], set(), set(), 60.0) == []
    assert s.due([A], set(), set(), 200.0) == [A]


def test_our_own_address_is_never_pinged_again() -> None:
    s = schedule()
    assert s.due([SELF], set(), set(), 0.0) == [SELF]
    s.answered(SELF, ME, ME, 0.0)
    assert s.due([SELF], set(), set(), 1000.0) == []


def test_an_address_being_pinged_is_not_handed_out_twice() -> None:
    s = schedule()
    assert s.due([A], set(), set(), 0.0) == [A]
    assert s.due([A], set(), set(), 5.0) == []


def test_a_round_pings_at_most_batch_addresses_most_overdue_first() -> None:
    s = schedule(batch=2)
    many = [BootstrapEndpoint(f"10.0.1.{i}", 5001) for i in range(5)]
    first = s.due(many, set(), set(), 0.0)
    assert len(first) == 2
    for endpoint in first:
        s.failed(endpoint, 0.0)
    second = s.due(many, set(), set(), 2.0)
    # The three not yet pinged have waited longest.
    assert len(second) == 2 and not set(second) & set(first)


def test_addresses_no_longer_listed_are_forgotten() -> None:
    s = schedule()
    assert s.due([A], set(), set(), 0.0) == [A]
    s.failed(A, 0.0)
    s.due([B], set(), set(), 2.0)
    assert s.failures(A) == 0


def test_bad_timings_are_refused() -> None:
    with pytest.raises(ValueError):
        RejoinSchedule(base=2.0, cap=1.0, recheck=10.0)
    with pytest.raises(ValueError):
        RejoinSchedule(base=1.0, cap=2.0, recheck=10.0, batch=0)
