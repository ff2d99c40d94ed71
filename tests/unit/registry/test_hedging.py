"""Peer choice and hedge timing of the mirror path (pure)."""

from __future__ import annotations

import pytest

from services.registry.mirror.hedging import (
    MIN_HEDGE_DELAY_S,
    RATE_TTL_S,
    Peer,
    PeerBook,
    peer_from_contact,
)

A, B, C = Peer("10.0.0.1", 6443), Peer("10.0.0.2", 6443), Peer("10.0.0.3", 7443)


def test_unknown_peers_keep_discovery_order() -> None:
    assert PeerBook().choose([B, A, C]) == B
    assert PeerBook().choose([]) is None


def test_least_used_peer_is_chosen_first() -> None:
    book = PeerBook()
    book.begin(B)
    assert book.choose([B, A]) == A
    book.begin(A)
    book.begin(A)
    assert book.choose([B, A]) == B
    book.end(A)
    book.end(A)
    book.end(A)  # an extra end never makes a count negative
    assert book.load(A).in_flight == 0


def test_among_equally_used_peers_the_fastest_wins() -> None:
    book = PeerBook()
    book.observe(A, 0.030)
    book.observe(B, 0.002)
    assert book.choose([A, B]) == B
    # A new peer is tried before known slow ones.
    assert book.choose([A, C]) == C


def test_latency_is_smoothed() -> None:
    book = PeerBook(alpha=0.5)
    book.observe(A, 0.010)
    book.observe(A, 0.030)
    assert book.load(A).latency == pytest.approx(0.020)


def test_a_failed_peer_ranks_behind_answering_ones_without_skewing_hedges() -> None:
    book = PeerBook(min_samples=1)
    book.observe(A, 0.004)
    book.penalise(B, 2.0)
    assert book.choose([B, A]) == A
    assert list(book.recent) == [0.004]


def test_hedge_delay_is_the_header_wait_until_enough_samples() -> None:
    book = PeerBook(min_samples=5)
    for _ in range(4):
        book.observe(A, 0.001)
    assert book.hedge_delay(0.04) == 0.04
    book.observe(A, 0.001)
    assert book.hedge_delay(0.04) == MIN_HEDGE_DELAY_S


def test_hedge_delay_follows_the_latency_percentile_within_bounds() -> None:
    book = PeerBook(min_samples=10, quantile=0.9)
    for i in range(1, 11):
        book.observe(A, i / 1000)
    assert book.hedge_delay(0.04) == pytest.approx(0.009)
    # A slow cluster never waits past the configured header wait.
    for _ in range(200):
        book.observe(B, 0.5)
    assert book.hedge_delay(0.04) == 0.04


def test_the_book_forgets_idle_peers_beyond_its_bound() -> None:
    book = PeerBook(max_peers=2)
    book.begin(A)
    book.observe(B, 0.01)
    book.observe(C, 0.01)
    assert book.load(A).in_flight == 1  # busy peers are kept
    assert B not in book._peers
    assert C in book._peers


def test_contacts_must_be_ip_literals_with_a_port() -> None:
    assert peer_from_contact("10.1.2.3", 6443) == Peer("10.1.2.3", 6443)
    assert peer_from_contact("fd00::0001", 6443) == Peer("fd00::1", 6443)
    assert str(Peer("fd00::1", 6443)) == "[fd00::1]:6443"
    assert peer_from_contact("registry.example", 6443) is None
    assert peer_from_contact("10.1.2.3", 0) is None
    assert peer_from_contact("0.0.0.0", 6443) is None
    assert peer_from_contact("224.0.0.1", 6443) is None


def test_a_peer_ranked_down_as_slow_is_chosen_last_until_it_is_fast_again() -> None:
    book = PeerBook()
    slow, other = Peer("10.0.0.1", 1, "aa"), Peer("10.0.0.2", 1, "bb")
    book.observe_rate(slow, 100e6)
    book.observe_rate(other, 50e6)
    assert book.peak_rate() == 100e6
    book.rank_down(slow, 1e6)
    assert book.rate(slow) is None
    assert book.is_slow(slow)
    assert book.peak_rate() == 50e6
    book.begin(other)  # busier, yet still preferred to a slow peer
    assert book.choose([slow, other]) == other
    book.observe_rate(slow, 80e6)
    assert book.choose([slow, other]) == slow


def test_the_peak_rate_can_leave_out_the_peer_being_judged() -> None:
    # A relay judging a peer must not take that peer's own rate for what others would give.
    book = PeerBook()
    book.observe_rate(A, 100e6)
    assert book.peak_rate(excluding=A) is None
    book.observe_rate(B, 50e6)
    assert book.peak_rate(excluding=A) == 50e6
    assert book.peak_rate(excluding=B) == 100e6


def test_a_peer_is_judged_by_its_node_not_its_port() -> None:
    assert Peer("10.0.0.1", 1, "aa").identity == Peer("10.0.0.9", 2, "aa").identity
    assert Peer("10.0.0.1", 1).identity != Peer("10.0.0.1", 2).identity


def test_a_rate_measured_long_ago_is_not_known_any_more() -> None:
    # A peer whose link slowed after its rate was measured must not stand for a fast peer: a
    # relay would leave an honest peer for it (seen in bench.relay_paths under load).
    now = [100.0]
    book = PeerBook(clock=lambda: now[0])
    book.observe_rate(A, 100e6)
    book.observe_rate(B, 50e6)
    assert book.rate(A) == 100e6 and book.peak_rate() == 100e6
    now[0] += RATE_TTL_S + 1
    book.observe_rate(B, 40e6)
    assert book.rate(A) is None
    # B's own old rate is not averaged in either: it starts again from what it sends now.
    assert book.peak_rate() == 40e6
