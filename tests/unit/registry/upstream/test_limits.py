"""The per-node upstream caps: token bucket arithmetic and the fetch limiter's refusals."""

from __future__ import annotations

import asyncio

import pytest

from services.registry.upstream.errors import UpstreamBusy
from services.registry.upstream.limits import FetchLimiter, TokenBucket


def test_bucket_allows_a_burst_then_paces_at_the_rate() -> None:
    bucket = TokenBucket(rate=1000, burst=1000, now=0.0)
    assert bucket.take(1000, now=0.0) == 0.0
    assert bucket.take(500, now=0.0) == pytest.approx(0.5)
    assert bucket.take(500, now=0.0) == pytest.approx(1.0)  # queues behind the debt
    assert bucket.delay(now=0.5) == pytest.approx(0.5)
    assert bucket.delay(now=1.0) == 0.0
    assert bucket.take(250, now=1.25) == 0.0


def test_bucket_refills_no_further_than_the_burst() -> None:
    bucket = TokenBucket(rate=100, burst=200, now=0.0)
    bucket.take(200, now=0.0)
    assert bucket.take(200, now=100.0) == 0.0
    assert bucket.take(100, now=100.0) == pytest.approx(1.0)


def test_bucket_takes_chunks_larger_than_its_burst() -> None:
    bucket = TokenBucket(rate=10, burst=10, now=0.0)
    assert bucket.take(50, now=0.0) == pytest.approx(4.0)


def test_bucket_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1, now=0.0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_limiter_refuses_past_the_slot_count_after_the_wait() -> None:
    limiter = FetchLimiter(max_fetches=2, max_bandwidth=0, queue_wait=0.01)
    await limiter.acquire()
    await limiter.acquire()
    assert limiter.in_flight == 2
    with pytest.raises(UpstreamBusy, match="2 upstream fetches in flight"):
        await limiter.acquire()
    limiter.release()
    await limiter.acquire()  # a freed slot is taken again
    assert limiter.in_flight == 2


async def test_limiter_hands_a_slot_to_a_waiter_within_the_wait() -> None:
    limiter = FetchLimiter(max_fetches=1, max_bandwidth=0, queue_wait=5.0)
    await limiter.acquire()
    waiter = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0)  # one loop turn: the waiter queues for a slot (a yield, not a wait)
    assert not waiter.done()
    limiter.release()
    await waiter
    assert limiter.in_flight == 1


async def test_limiter_refuses_when_the_bandwidth_backlog_exceeds_the_wait() -> None:
    clock = FakeClock()
    limiter = FetchLimiter(max_fetches=4, max_bandwidth=1000, queue_wait=0.5, clock=clock)
    await limiter.acquire()
    assert limiter.bucket is not None
    limiter.bucket.take(2000, clock.now)  # one second of backlog
    with pytest.raises(UpstreamBusy, match="bandwidth"):
        await limiter.acquire()
    assert limiter.in_flight == 1  # the refused fetch gave its slot back
    clock.now = 0.6  # backlog now 0.4 s: within the wait
    await limiter.acquire()
    assert limiter.in_flight == 2


async def test_pace_is_free_without_a_cap() -> None:
    limiter = FetchLimiter(max_fetches=1, max_bandwidth=0, queue_wait=0.1)
    await limiter.pace(10**12)
    assert limiter.bucket is None
