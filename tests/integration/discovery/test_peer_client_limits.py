"""The discovery peer client takes answers as large as grpc.max_message_bytes allows, no larger."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import grpc
import pytest

from services.common.genproto.peermirror.discovery.v1 import peer_pb2 as pb
from services.common.genproto.peermirror.discovery.v1 import peer_pb2_grpc as pb_grpc
from services.common.grpc_server import GrpcServer
from services.discovery.kademlia import Contact, DhtConfig, DhtNode
from services.discovery.peer_client import PeerServiceClient
from services.discovery.peer_servicer import SERVICE_NAME
from tests.harness.peer_stubs import NoLeases

Context = grpc.aio.ServicerContext[object, object]

MIB = 1024 * 1024
# Providers in the big answer: each is about 60 bytes on the wire, so about 6 MiB in all,
# over gRPC's own 4 MiB default for a received message.
BIG_ANSWER = 100_000


class BigAnswers(NoLeases, pb_grpc.PeerServicer):
    """A Peer service whose GetProviders answer is over 4 MiB; it serves nothing else."""

    async def Ping(self, request: pb.PingRequest, context: Context) -> pb.PingResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not served")

    async def FindNode(self, request: pb.FindNodeRequest, context: Context) -> pb.FindNodeResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not served")

    async def AddProvider(
        self, request: pb.AddProviderRequest, context: Context
    ) -> pb.AddProviderResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not served")

    async def RemoveProvider(
        self, request: pb.RemoveProviderRequest, context: Context
    ) -> pb.RemoveProviderResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not served")

    async def GetProviders(
        self, request: pb.GetProvidersRequest, context: Context
    ) -> pb.GetProvidersResponse:
        return pb.GetProvidersResponse(
            providers=[
                pb.Provider(
                    node=pb.Contact(
                        node_id=os.urandom(32),
                        address="10.1.2.3",
                        discovery_port=5001,
                        registry_port=6443,
                    )
                )
                for _ in range(BIG_ANSWER)
            ]
        )


@pytest.fixture
async def big_server() -> AsyncIterator[GrpcServer]:
    server = GrpcServer("127.0.0.1:0", name="big-answers", max_message_bytes=64 * MIB)
    servicer = BigAnswers()
    server.add_service(SERVICE_NAME, lambda s: pb_grpc.add_PeerServicer_to_server(servicer, s))
    await server.start()
    try:
        yield server
    finally:
        await server.stop(None)


def _client(max_message_bytes: int) -> PeerServiceClient:
    me = Contact(os.urandom(32), "127.0.0.1", 5001, 6443)
    node = DhtNode(me, DhtConfig())
    return PeerServiceClient(
        node,
        lambda: pb.SenderInfo(node_id=me.node_id, discovery_port=5001, registry_port=6443),
        rpc_timeout=10.0,
        probe_timeout=10.0,
        clock=lambda: 0.0,
        max_message_bytes=max_message_bytes,
    )


@pytest.mark.parametrize(("limit", "accepted"), [(16 * MIB, True), (1 * MIB, False)])
async def test_peer_answers_are_bounded_by_grpc_max_message_bytes(
    big_server: GrpcServer, limit: int, accepted: bool
) -> None:
    client = _client(limit)
    peer = Contact(os.urandom(32), "127.0.0.1", big_server.port, 6443)
    try:
        answer = await client.get_providers(peer, os.urandom(32), 0)
    finally:
        await client.close()
    if accepted:
        assert answer is not None
        assert len(answer.providers) == BIG_ANSWER
    else:
        assert answer is None
