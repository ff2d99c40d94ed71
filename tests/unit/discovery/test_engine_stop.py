"""Stopping the discovery engine ends all of its background work, even right after a wake-up."""

from __future__ import annotations

import asyncio
import os

from services.discovery.engine import DiscoveryEngine
from services.discovery.kademlia import DhtConfig


def running_engine_tasks() -> list[asyncio.Task[object]]:
    return [
        task
        for task in asyncio.all_tasks()
        if task.get_name().startswith("discovery-") and not task.done()
    ]


async def test_stop_right_after_advertise_ends_the_maintenance_loop() -> None:
    # advertise() wakes the maintenance loop; a stop in the same moment used to have its
    # cancel dropped by asyncio.wait_for (Python 3.11), leaving the loop running for ever.
    for _ in range(5):
        engine = DiscoveryEngine(
            os.urandom(32), DhtConfig(), discovery_port=5001, registry_port=5000
        )
        await engine.start()
        await asyncio.wait_for(engine.ready.wait(), 30.0)
        engine.advertise(["docker.io/library/alpine:3"])
        await engine.stop()
        assert running_engine_tasks() == []
