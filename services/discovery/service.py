"""Runs the discovery service: the Peer protocol on the cluster port, LocalDiscovery on the node.

Two gRPC servers on purpose: the Peer service (discovery.host:discovery.port) is what other
nodes call; the LocalDiscovery API (discovery.local_address) lets local callers advertise
and look up, and is never reachable from the peer port. Both report health NOT_SERVING
until the node has joined (or knows it is alone).

With K3s ``embedded-registry: false`` the node takes no part: the peer port is not opened and no
bootstrap source is asked, so the node is alone; the local API and health still answer.
"""

from __future__ import annotations

import asyncio

from services.common.config import ConfigError, NodeConfig
from services.common.genproto.peermirror.discovery.v1 import local_pb2_grpc, peer_pb2_grpc
from services.common.grpc_server import GrpcServer, run_until_signal
from services.common.hostport import join_host_port
from services.common.logsetup import get_logger
from services.common.metrics import start_listener
from services.common.ratelog import LimitLog
from services.common.tls import (
    client_context,
    grpc_channel_credentials,
    grpc_server_credentials,
    tls_files,
)
from services.discovery.bootstrap import BootstrapSources
from services.discovery.engine import DiscoveryEngine
from services.discovery.identity import ServerIdentities, node_id_for
from services.discovery.kademlia import DhtConfig
from services.discovery.lease_broker import LeaseBroker
from services.discovery.local_servicer import SERVICE_NAME as LOCAL_SERVICE
from services.discovery.local_servicer import KeyLimits, LocalDiscoveryServicer
from services.discovery.metrics import DiscoveryMetrics
from services.discovery.peer_servicer import SERVICE_NAME as PEER_SERVICE
from services.discovery.peer_servicer import PeerServicer
from services.discovery.wire import normalize_ip

# Leaves headroom inside the 5 s the node and kubelet allow between SIGTERM and exit.
STOP_BUDGET = 4.0
# In-flight RPCs get this long once a stop began.
STOP_GRACE = 1.0

log = get_logger(__name__)


def dht_config(cfg: NodeConfig) -> DhtConfig:
    """The core's settings from the node config; inconsistent timings are a ConfigError."""
    d = cfg.discovery
    try:
        return DhtConfig(
            max_failures=d.max_failures,
            probe_interval=d.probe_interval,
            probe_timeout=d.probe_timeout,
            liveness_window=d.liveness_window,
            record_ttl=d.record_ttl,
            max_record_ttl=d.record_ttl,
            republish_interval=d.republish_interval,
            max_batch_keys=d.max_keys_per_peer_call,
            max_records_per_peer=d.max_records_per_peer,
            max_records_total=d.max_records_total,
            peer_records_per_second=d.peer_records_per_second,
        )
    except ValueError as exc:
        raise ConfigError(f"discovery: {exc}") from None


class DiscoveryService:
    """Both servers and the engine of one discovery node; tests run many in one process."""

    def __init__(self, cfg: NodeConfig) -> None:
        d = cfg.discovery
        self.cfg = cfg
        self.taking_part = cfg.k3s.takes_part
        # Mutual TLS on the peer port and every call to peers, unless tls.enabled is false.
        self.tls = tls_files(cfg)
        address = ""
        if cfg.node.address:
            address = normalize_ip(cfg.node.address) or ""
            if not address:
                raise ConfigError(f"node.address: not an IP address: {cfg.node.address!r}")
        self.engine = DiscoveryEngine(
            node_id_for(cfg.node.data_dir, self.tls),
            dht_config(cfg),
            discovery_port=d.port,
            registry_port=cfg.registry.port,
            address=address,
            sources=(
                BootstrapSources(
                    peers=tuple(d.bootstrap_peers),
                    dns=d.bootstrap_dns,
                    url=d.bootstrap_url,
                    default_port=d.port,
                )
                if self.taking_part
                else BootstrapSources(default_port=d.port)
            ),
            rpc_timeout=d.rpc_timeout,
            lookup_cache_ttl=d.lookup_cache_ttl,
            on_ready=self._serving,
            channel_credentials=(
                grpc_channel_credentials(self.tls) if self.tls is not None else None
            ),
            max_message_bytes=cfg.grpc.max_message_bytes,
            server_identities=(
                ServerIdentities(client_context(self.tls)) if self.tls is not None else None
            ),
        )
        engine = self.engine
        self.leases = LeaseBroker(engine, d)
        # One per node: refusals logged once per client and limit, whichever API was called.
        limit_log = LimitLog(__name__)
        self.peer_server = GrpcServer(
            join_host_port(d.host, d.port),
            name="discovery-peer",
            credentials=grpc_server_credentials(self.tls) if self.tls is not None else None,
            max_message_bytes=cfg.grpc.max_message_bytes,
            limit_log=limit_log,
        )
        peer = PeerServicer(
            engine.node,
            engine.client,
            engine.sender_info,
            engine.clock,
            bind_identity=self.tls is not None,
            limit_log=limit_log,
            leases=self.leases.authority,
        )
        self.peer_server.add_service(
            PEER_SERVICE, lambda s: peer_pb2_grpc.add_PeerServicer_to_server(peer, s)
        )
        self.local_server = GrpcServer(
            d.local_address,
            name="discovery-local",
            max_message_bytes=cfg.grpc.max_message_bytes,
            limit_log=limit_log,
        )
        self.metrics = DiscoveryMetrics(engine, self.leases)
        local = LocalDiscoveryServicer(
            engine, self.metrics, limits=KeyLimits.of(d), limit_log=limit_log, leases=self.leases
        )
        self.local_server.add_service(
            LOCAL_SERVICE, lambda s: local_pb2_grpc.add_LocalDiscoveryServicer_to_server(local, s)
        )

    @property
    def peer_address(self) -> str:
        """host:port other nodes reach this node's Peer service at."""
        return self.peer_server.bound_address

    @property
    def local_address(self) -> str:
        """Address of the node-local API."""
        return self.local_server.bound_address

    async def start(self) -> None:
        """Listen on both addresses (only the local one when not taking part), then join the
        network in the background."""
        if self.taking_part:
            port = await self.peer_server.start(serving=False)
            self.engine.set_discovery_port(port)
        try:
            await self.local_server.start(serving=False)
        except BaseException:
            await self.peer_server.stop(None)
            raise
        await self.engine.start()

    async def _serving(self) -> None:
        servers = [self.local_server]
        if self.taking_part:
            servers.append(self.peer_server)
        for server in servers:
            for name in ["", *server.service_names]:
                await server.set_serving(name, True)

    async def stop(self) -> None:
        """Stop answering, then stop background work (see DiscoveryEngine.stop on why
        records are not withdrawn)."""
        try:
            await asyncio.gather(
                self.local_server.stop(STOP_GRACE), self.peer_server.stop(STOP_GRACE)
            )
        finally:
            # Background work and channels go even when a server failed to stop.
            await self.engine.stop()


async def run(cfg: NodeConfig) -> None:
    """Serve until SIGTERM/SIGINT, then stop within the budget."""
    service = DiscoveryService(cfg)
    await service.start()
    log.info(
        "discovery started",
        node=cfg.node.name,
        node_id=service.engine.node_id.hex(),
        peer_address=service.peer_address if service.taking_part else None,
        local_address=service.local_address,
        tls=service.tls is not None,
    )
    if service.tls is None and service.taking_part:
        log.warning(
            "tls.enabled is false: the discovery peer port is plaintext without client "
            "certificates; any host that reaches it can join, advertise and claim any node ID "
            "(development and demo only)",
            node=cfg.node.name,
        )
    if not service.taking_part:
        log.warning(
            "K3s embedded-registry is false: this node takes no part, no peer port is opened "
            "and no peer is contacted",
            node=cfg.node.name,
        )
    metrics = await start_listener(
        cfg.discovery.metrics_address, service.metrics.registry, service="discovery"
    )

    async def stop() -> None:
        if metrics is not None:
            await metrics.stop()
        await service.stop()

    await run_until_signal(stop, stop_timeout=STOP_BUDGET)
    log.info("discovery stopped")
