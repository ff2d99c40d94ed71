"""Iterative lookup state machine: parallelism, convergence, termination, providers, hops."""

from __future__ import annotations

import random

import pytest

from services.discovery.kademlia import ID_BITS, Contact, Lookup, QueryState
from services.discovery.kademlia.node_id import int_id
from tests.unit.discovery.helpers import contact

TARGET = int_id(0)


def drive(lookup: Lookup, answer: dict[bytes, list[Contact]] | None, dead: set[bytes]) -> int:
    """Runs the lookup against a static network; returns the number of rounds."""
    rounds = 0
    while not lookup.done:
        queries = lookup.next_queries()
        assert queries, "not done yet nothing to ask"
        assert lookup.in_flight <= lookup.alpha
        rounds += 1
        for c in queries:
            if c.node_id in dead:
                lookup.on_failure(c)
            else:
                lookup.on_response(c, (answer or {}).get(c.node_id, []))
    return rounds


def test_never_more_than_alpha_in_flight() -> None:
    seeds = [contact(v) for v in range(1, 11)]
    lookup = Lookup(TARGET, seeds, k=5, alpha=3)
    first = lookup.next_queries()
    assert [c.node_id for c in first] == [c.node_id for c in seeds[:3]]  # closest first
    assert lookup.next_queries() == []
    lookup.on_response(first[0], [])
    assert len(lookup.next_queries()) == 1
    assert lookup.in_flight == 3


def test_terminates_when_every_contact_fails() -> None:
    seeds = [contact(v) for v in range(1, 30)]
    lookup = Lookup(TARGET, seeds, k=5, alpha=3)
    drive(lookup, None, dead={c.node_id for c in seeds})
    assert lookup.done
    assert lookup.result() == []
    # Every candidate had to be tried since each failure let a farther one into the k.
    assert all(lookup.state_of(c.node_id) is QueryState.FAILED for c in seeds)
    assert lookup.hops == 0


def test_terminates_when_no_closer_nodes_appear() -> None:
    seeds = [contact(v) for v in range(1, 9)]
    lookup = Lookup(TARGET, seeds, k=5, alpha=2)
    drive(lookup, None, dead=set())
    # Only the 5 closest were asked; the rest could not improve the result.
    assert lookup.queries_sent == 5
    assert [c.node_id for c in lookup.result()] == [c.node_id for c in seeds[:5]]
    assert lookup.state_of(seeds[6].node_id) is QueryState.WAITING


def test_no_seeds_is_done_at_once() -> None:
    lookup = Lookup(TARGET, [])
    assert lookup.done
    assert lookup.next_queries() == []


def test_failures_let_farther_contacts_in() -> None:
    seeds = [contact(v) for v in range(1, 9)]
    dead = {seeds[0].node_id, seeds[2].node_id}
    lookup = Lookup(TARGET, seeds, k=3, alpha=3)
    drive(lookup, None, dead=dead)
    assert [c.node_id for c in lookup.result()] == [
        seeds[1].node_id,
        seeds[3].node_id,
        seeds[4].node_id,
    ]


def test_converges_to_true_closest_on_a_random_network() -> None:
    rng = random.Random(11)
    k = 8
    nodes = [contact(rng.getrandbits(ID_BITS)) for _ in range(400)]
    target = rng.getrandbits(ID_BITS)

    # Each node knows 3 random nodes plus its 8 XOR-nearest neighbours: enough structure
    # for greedy routing toward any target.
    def knows(c: Contact) -> list[Contact]:
        near = sorted(nodes, key=lambda o: o.key ^ c.key)[1 : k + 1]
        return near + rng.sample(nodes, 3)

    answers = {c.node_id: knows(c) for c in nodes}
    for c in nodes:
        answers[c.node_id].sort(key=lambda o: o.key ^ target)
    lookup = Lookup(int_id(target), rng.sample(nodes, 3), k=k, alpha=3)
    drive(lookup, answers, dead=set())
    expected = sorted(nodes, key=lambda o: o.key ^ target)[:k]
    assert lookup.result() == expected
    assert lookup.hops >= 2


def test_never_queries_itself_and_ignores_unsolicited_answers() -> None:
    me = contact(5)
    other = contact(9)
    lookup = Lookup(TARGET, [me, other], k=5, self_id=me.node_id)
    assert lookup.next_queries() == [other]
    assert lookup.on_response(contact(77), [contact(3)]) == []
    assert lookup.state_of(contact(3).node_id) is None
    lookup.on_response(other, [me, contact(3)])
    assert lookup.state_of(me.node_id) is None
    assert lookup.state_of(contact(3).node_id) is QueryState.WAITING


def test_providers_are_reported_once_and_limit_stops_the_lookup() -> None:
    me = contact(100)
    seeds = [contact(v) for v in range(1, 6)]
    p1, p2, p3 = contact(1001), contact(1002), contact(1003)
    lookup = Lookup(
        TARGET, seeds, k=5, alpha=1, self_id=me.node_id, find_providers=True, provider_limit=2
    )
    [first] = lookup.next_queries()
    assert lookup.on_response(first, [], providers=[me, p1]) == [p1]  # never ourselves
    assert not lookup.done
    [second] = lookup.next_queries()
    assert lookup.on_response(second, [], providers=[p1, p2, p3]) == [p2]
    assert lookup.done
    assert lookup.providers == [p1, p2]
    assert lookup.hops == 1
    assert lookup.next_queries() == []


def test_provider_lookup_without_limit_runs_to_the_end() -> None:
    seeds = [contact(v) for v in range(1, 4)]
    lookup = Lookup(TARGET, seeds, k=3, alpha=3, find_providers=True)
    for c in lookup.next_queries():
        lookup.on_response(c, [], providers=[contact(500 + c.key)])
    assert lookup.done
    assert len(lookup.providers) == 3


def test_hops_follow_the_query_chain() -> None:
    far = contact(1 << 200)
    mid = contact(1 << 100)
    near = contact(1 << 10)
    lookup = Lookup(TARGET, [far], k=1, alpha=1, find_providers=True)
    drive(lookup, {far.node_id: [mid], mid.node_id: [near]}, dead=set())
    assert lookup.result() == [near]
    assert lookup.hops == 3


def test_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError):
        Lookup(TARGET, [], alpha=0)
    with pytest.raises(ValueError):
        Lookup(TARGET, [], find_providers=True, provider_limit=0)
