"""Registries on loopback sharing first pulls: each with its own in-flight coordinator and spool,
one lease table for all, a fake LocalDiscovery naming a node once it advertised, one upstream."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from services.common.store.oci_layout import OciLayoutStore
from services.registry.inflight.coordinator import Coordinator, InflightSettings
from services.registry.inflight.ports import Holder
from services.registry.inflight.spool import SpoolPool
from tests.harness.fake_discovery import FakeDiscovery
from tests.harness.fake_router import LeaseTable
from tests.harness.registry_inproc import RunningRegistry, serve_registry
from tests.harness.slow_upstream import SlowUpstreamClient

SPOOL_BYTES = 1 << 30


class ProvidedAfter:
    """KeyAdvertiser that makes the fake discovery name the registry on `port` as a provider
    after `delay` seconds, as a DHT publish takes a moment to be visible."""

    def __init__(self, discovery: FakeDiscovery, delay: float) -> None:
        self.discovery = discovery
        self.delay = delay
        self.port = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def advertise(self, keys: Sequence[str]) -> None:
        async def later() -> None:
            # A fixed delay on purpose: it plays the DHT's publish latency, which is the point.
            await asyncio.sleep(self.delay)
            self.discovery.provide(list(keys), ("127.0.0.1", self.port))

        task = asyncio.create_task(later())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def withdraw(self, keys: Sequence[str]) -> None:
        for key in keys:
            self.discovery.providers.pop(key, None)


@dataclass
class InflightNode:
    registry: RunningRegistry
    coordinator: Coordinator
    leases: LeaseTable
    me: Holder
    discovery: FakeDiscovery

    async def crash(self) -> None:
        """Stop this node as a crash would look to the others: its lease is left to expire."""
        self.leases.crash(self.me)
        await self.registry.http.stop()


@contextlib.asynccontextmanager
async def inflight_cluster(
    work_dir: Path,
    count: int,
    upstream_port: int,
    *,
    advertise_delay: float = 0.0,
    settings: InflightSettings | None = None,
    lease_ttl: float = 5.0,
) -> AsyncIterator[list[InflightNode]]:
    """`count` registries under `work_dir` fetching from the SlowUpstream on `upstream_port`;
    a holder that stops renewing loses its lease after `lease_ttl` seconds."""
    leases = LeaseTable(ttl=lease_ttl)
    async with FakeDiscovery() as discovery, contextlib.AsyncExitStack() as stack:
        client = SlowUpstreamClient(upstream_port)
        stack.push_async_callback(client.close)
        nodes = []
        for i in range(count):
            home = work_dir / f"node-{i}"
            home.mkdir()
            advertiser = ProvidedAfter(discovery, advertise_delay)
            me = Holder("127.0.0.1", 1000 + i)
            coordinator = Coordinator(
                settings or InflightSettings(retry_interval_s=0.05),
                SpoolPool(home / "spool", SPOOL_BYTES, grace_s=60),
                leases.client(me),
                client,
                advertiser,
            )
            store = OciLayoutStore(home / "layout", create=True)
            stack.push_async_callback(store.close)
            registry = await stack.enter_async_context(
                serve_registry(store, home, discovery=discovery.address, inflight=coordinator)
            )
            advertiser.port = registry.port
            nodes.append(InflightNode(registry, coordinator, leases, me, discovery))
        yield nodes
