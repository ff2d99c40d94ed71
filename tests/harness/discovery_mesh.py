"""Many discovery nodes in one process on loopback, each with its own two gRPC servers.

The DHT tests and the latency benchmark build their mesh here: every node is a full
DiscoveryService (real sockets, real gRPC) joining through one bootstrap address.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from services.common.config import (
    DiscoverySection,
    LogSection,
    NodeConfig,
    NodeSection,
    RegistrySection,
    TlsSection,
)
from services.common.genproto.peermirror.discovery.v1 import local_pb2 as lpb
from services.common.genproto.peermirror.discovery.v1 import local_pb2_grpc as lpb_grpc
from services.discovery.service import DiscoveryService

# Re-exported for tests/integration/inflight (another change owns it); new code imports
# tests.harness.wait.
from tests.harness.wait import wait_until as wait_until

# Registry ports the nodes announce (nothing listens there; the DHT only carries them).
REGISTRY_PORT_BASE = 17000


# Discovery timings for tests: a node is probed every second and dropped 3 s after it stops
# answering, so joins, deaths and rejoins show within seconds.
FAST_PROBING: dict[str, float] = {
    "probe_interval": 1.0,
    "probe_timeout": 1.0,
    "liveness_window": 3.0,
}
# The same, with lookups that are cached for a second and RPCs that give up after one.
FAST_LOOKUPS: dict[str, float] = {**FAST_PROBING, "lookup_cache_ttl": 1.0, "rpc_timeout": 1.0}


def node_config(root: Path, index: int, bootstrap: list[str], **discovery: Any) -> NodeConfig:
    """Config of mesh node `index`: loopback, ports picked by the OS, its own data dir."""
    section = dataclasses.replace(
        DiscoverySection(
            host="127.0.0.1",
            port=0,
            local_address="127.0.0.1:0",
            bootstrap_peers=bootstrap,
        ),
        **discovery,
    )
    return NodeConfig(
        node=NodeSection(name=f"mesh-{index}", data_dir=root / f"node-{index}"),
        log=LogSection(level="info", format="json"),
        registry=RegistrySection(port=REGISTRY_PORT_BASE + index),
        discovery=section,
        tls=TlsSection(enabled=False),
    )


@dataclass
class Mesh:
    """The running nodes; `nodes[0]` is the bootstrap node."""

    root: Path
    discovery: dict[str, Any] = field(default_factory=dict)
    nodes: list[DiscoveryService] = field(default_factory=list)
    stopped: set[int] = field(default_factory=set)

    @property
    def bootstrap(self) -> str:
        """The one address every other node joins through."""
        return self.nodes[0].peer_address

    async def add(self, *, ready_timeout: float = 20.0) -> DiscoveryService:
        """Starts one more node (joining through node 0) and waits until it is ready."""
        index = len(self.nodes)
        bootstrap = [self.bootstrap] if self.nodes else []
        service = DiscoveryService(node_config(self.root, index, bootstrap, **self.discovery))
        self.nodes.append(service)
        await service.start()
        await asyncio.wait_for(service.engine.ready.wait(), ready_timeout)
        return service

    async def grow(self, count: int) -> None:
        """Adds `count` nodes one after another, as nodes joining a cluster would."""
        for _ in range(count):
            await self.add()

    async def kill(self, index: int) -> None:
        """Stops a node's servers and work at once, as a crash looks to the others."""
        self.stopped.add(index)
        service = self.nodes[index]
        await service.local_server.stop(None)
        await service.peer_server.stop(None)
        await service.engine.stop()

    def live(self) -> list[DiscoveryService]:
        """Nodes not stopped."""
        return [n for i, n in enumerate(self.nodes) if i not in self.stopped]

    async def close(self) -> None:
        """Stops every node still running."""
        for index in range(len(self.nodes)):
            if index not in self.stopped:
                self.stopped.add(index)
                await self.nodes[index].stop()


async def find_providers(address: str, key: str, limit: int = 0) -> list[lpb.FindProvidersResponse]:
    """FindProviders through a node's local gRPC API, the way the registry asks."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = lpb_grpc.LocalDiscoveryStub(channel)
        call = stub.FindProviders(lpb.FindProvidersRequest(key=key, limit=limit), timeout=10.0)
        return [reply async for reply in call]
