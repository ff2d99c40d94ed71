"""Discovery nodes over mutual TLS on loopback, and raw Peer calls with a chosen certificate."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
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
from services.common.genproto.peermirror.discovery.v1 import peer_pb2 as pb
from services.common.genproto.peermirror.discovery.v1 import peer_pb2_grpc as pb_grpc
from services.common.tls import TlsFiles, grpc_channel_credentials
from services.discovery.identity import node_id_of_certificate
from services.discovery.service import DiscoveryService

READY_TIMEOUT = 20.0


def tls_section(files: TlsFiles) -> TlsSection:
    return TlsSection(ca_file=files.ca_file, cert_file=files.cert_file, key_file=files.key_file)


def discovery_config(
    data_dir: Path,
    files: TlsFiles,
    *,
    registry_port: int = 6443,
    bootstrap: Sequence[str] = (),
    local_address: str = "127.0.0.1:0",
    **discovery: Any,
) -> NodeConfig:
    """A loopback discovery node over mutual TLS with `files` (`discovery`: more keys of the
    discovery section)."""
    return NodeConfig(
        node=NodeSection(name=data_dir.name, data_dir=data_dir),
        log=LogSection(level="info", format="json"),
        registry=RegistrySection(port=registry_port),
        discovery=DiscoverySection(
            host="127.0.0.1",
            port=0,
            local_address=local_address,
            bootstrap_peers=list(bootstrap),
            # Short probes keep a dead bootstrap or a failed check from stretching a test.
            probe_timeout=1.0,
            rpc_timeout=1.0,
            **discovery,
        ),
        tls=tls_section(files),
    )


@contextlib.asynccontextmanager
async def discovery_node(cfg: NodeConfig) -> AsyncIterator[DiscoveryService]:
    """A started DiscoveryService, ready (joined, or alone), stopped on exit."""
    service = DiscoveryService(cfg)
    await service.start()
    try:
        await asyncio.wait_for(service.engine.ready.wait(), READY_TIMEOUT)
        yield service
    finally:
        await service.stop()


def sender(node_id: bytes, discovery_port: int = 5001, registry_port: int = 6443) -> pb.SenderInfo:
    return pb.SenderInfo(
        node_id=node_id, discovery_port=discovery_port, registry_port=registry_port
    )


@contextlib.asynccontextmanager
async def peer_stub(
    address: str, credentials: grpc.ChannelCredentials | None
) -> AsyncIterator[pb_grpc.PeerAsyncStub]:
    """A Peer stub on a fresh channel: TLS with `credentials`, plaintext when None."""
    channel = (
        grpc.aio.insecure_channel(address)
        if credentials is None
        else grpc.aio.secure_channel(address, credentials)
    )
    async with channel:
        yield pb_grpc.PeerStub(channel)


def credentials_of(files: TlsFiles) -> grpc.ChannelCredentials:
    return grpc_channel_credentials(files)


def node_id_of(files: TlsFiles) -> bytes:
    """The DHT node ID the certificate in `files` gives its holder."""
    return node_id_of_certificate(files.cert_file.read_bytes())
