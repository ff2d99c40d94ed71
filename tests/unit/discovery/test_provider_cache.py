"""Shared provider lookups stream to every follower; the short cache forgets dead nodes."""

from __future__ import annotations

import asyncio

from services.discovery.kademlia import Contact
from services.discovery.provider_cache import Flight, ProviderCache
from tests.unit.discovery.helpers import contact


async def _settle() -> None:
    """Lets every ready task run (a wake-up passes through a shield: a few loop turns)."""
    for _ in range(10):
        await asyncio.sleep(0)


async def _collect(flight: Flight, limit: int, out: list[Contact]) -> None:
    async for provider in flight.follow(limit):
        out.append(provider)


async def test_followers_get_each_provider_before_the_lookup_ends() -> None:
    flight = Flight(cap=5)
    first: list[Contact] = []
    second: list[Contact] = []
    tasks = [
        asyncio.create_task(_collect(flight, 5, first)),
        asyncio.create_task(_collect(flight, 1, second)),
    ]
    await _settle()
    flight.add([contact(1)])
    await _settle()
    assert first == [contact(1)]  # streamed while the lookup still runs
    await tasks[1]  # the limit-1 follower is done without waiting for the end
    assert second == [contact(1)]
    flight.add([contact(1), contact(2)])  # duplicates are not repeated
    flight.finish()
    await tasks[0]
    assert first == [contact(1), contact(2)]


async def test_flight_stops_growing_at_its_cap() -> None:
    flight = Flight(cap=2)
    flight.add([contact(1), contact(2), contact(3)])
    assert flight.full and flight.providers == [contact(1), contact(2)]


async def test_cancelled_follower_does_not_disturb_others() -> None:
    flight = Flight(cap=3)
    kept: list[Contact] = []
    gone: list[Contact] = []
    keeper = asyncio.create_task(_collect(flight, 3, kept))
    quitter = asyncio.create_task(_collect(flight, 3, gone))
    # Single loop turns (yields, not waits): both follow before the cancel, which lands next.
    await asyncio.sleep(0)
    quitter.cancel()
    await asyncio.sleep(0)
    flight.add([contact(4)])
    flight.finish()
    await keeper
    assert kept == [contact(4)]


def test_cache_expires_skips_empty_and_drops_dead_nodes() -> None:
    cache = ProviderCache(ttl=5.0)
    key, other = b"k" * 32, b"o" * 32
    cache.put(key, [contact(1), contact(2)], now=0.0)
    cache.put(other, [contact(1)], now=0.0)
    cache.put(b"e" * 32, [], now=0.0)
    assert cache.get(b"e" * 32, 1.0) is None
    assert cache.get(key, 4.9) == [contact(1), contact(2)]
    cache.drop_node(contact(1).node_id)
    assert cache.get(key, 1.0) == [contact(2)]
    assert cache.get(other, 1.0) is None
    assert cache.get(key, 5.0) is None
    assert len(cache) == 0


def test_cache_with_zero_ttl_keeps_nothing() -> None:
    cache = ProviderCache(ttl=0.0)
    cache.put(b"k" * 32, [contact(1)], now=0.0)
    assert cache.get(b"k" * 32, 0.0) is None
