"""A restarted bootstrap node is found again by nodes that still have other peers."""

from __future__ import annotations

import asyncio
from pathlib import Path

from services.discovery.service import DiscoveryService
from tests.harness.discovery_mesh import FAST_PROBING, node_config
from tests.harness.service_procs import free_port
from tests.harness.wait import wait_until

TIMINGS = FAST_PROBING


async def test_a_restarted_bootstrap_node_is_pinged_back_into_the_mesh(tmp_path: Path) -> None:
    port = free_port()
    seed_config = node_config(tmp_path, 0, [], port=port, **TIMINGS)
    seed = DiscoveryService(seed_config)
    await seed.start()
    others = [
        DiscoveryService(node_config(tmp_path, i, [f"127.0.0.1:{port}"], **TIMINGS)) for i in (1, 2)
    ]
    started = [seed]
    try:
        for service in others:
            started.append(service)
            await service.start()
            await asyncio.wait_for(service.engine.ready.wait(), 20.0)
        b, c = (service.engine for service in others)
        seed_id = seed.engine.node_id
        await wait_until(lambda: b.node_id in c.node.table and c.node_id in b.node.table, 10.0)

        await seed.stop()
        # Both drop the seed but keep each other, so neither bootstraps again.
        await wait_until(lambda: seed_id not in b.node.table and seed_id not in c.node.table, 15.0)
        assert c.node_id in b.node.table and b.node_id in c.node.table

        # Same data dir and port: the same node comes back knowing nobody, with no
        # bootstrap source of its own.
        seed = DiscoveryService(seed_config)
        started[0] = seed
        await seed.start()
        assert seed.engine.node_id == seed_id
        await wait_until(lambda: seed_id in b.node.table and seed_id in c.node.table, 20.0)
        await wait_until(lambda: b.node_id in seed.engine.node.table, 10.0)
        await wait_until(lambda: c.node_id in seed.engine.node.table, 10.0)

        seed.engine.advertise(["sha256:rejoin-test"])

        async def found_from_c() -> bool:
            found = [p.node_id async for p in c.find_providers("sha256:rejoin-test")]
            return seed_id in found

        await wait_until(found_from_c, 20.0, interval=0.5)
    finally:
        for service in reversed(started):
            await service.stop()
