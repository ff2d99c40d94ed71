"""Builds the node's shared-first-pull machinery from its config: the coordinator over the
LocalDiscovery API (leases, Advertise) and the node's one UpstreamClient, closed together."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from services.common.config import NodeConfig
from services.common.discovery_router import GrpcRouter
from services.common.k3s.registries import Registries
from services.registry.inflight.coordinator import Coordinator
from services.registry.inflight.upstream_adapter import ClientFetcher
from services.registry.upstream import UpstreamClient, UpstreamMetrics, UpstreamSettings


@dataclass
class SharedFirstPulls:
    """The coordinator and the clients it was built over (this object owns all three)."""

    coordinator: Coordinator
    upstream: UpstreamClient
    discovery: GrpcRouter

    @classmethod
    def build(
        cls,
        cfg: NodeConfig,
        registries: Callable[[], Registries],
        metrics: CollectorRegistry,
    ) -> SharedFirstPulls:
        """From `cfg`; `registries` gives the current registries.yaml (endpoints, TLS, auth),
        `metrics` takes the upstream client's metrics. The upstream client's per-node caps
        are the node's back-to-source limits."""
        upstream = UpstreamClient(
            registries, UpstreamSettings.from_config(cfg), UpstreamMetrics(metrics)
        )
        discovery = GrpcRouter(cfg.discovery.local_address, cfg.grpc.max_message_bytes)
        coordinator = Coordinator.from_config(cfg, discovery, ClientFetcher(upstream), discovery)
        return cls(coordinator, upstream, discovery)

    async def close(self) -> None:
        """Stop the fetches (readers are told), then close the clients."""
        await self.coordinator.close()
        await self.upstream.close()
        await self.discovery.close()
