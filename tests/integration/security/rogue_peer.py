"""A Peer service run by an authenticated but malicious node: it names whatever providers the test
wants, for any key, to see what the honest node does with them."""

from __future__ import annotations

import grpc

from services.common.genproto.peermirror.discovery.v1 import peer_pb2 as pb
from services.common.genproto.peermirror.discovery.v1 import peer_pb2_grpc as pb_grpc
from services.common.grpc_server import GrpcServer
from services.common.tls import TlsFiles, grpc_server_credentials
from services.discovery.identity import node_id_of_certificate
from services.discovery.peer_servicer import SERVICE_NAME
from tests.harness.peer_stubs import NoLeases

Context = grpc.aio.ServicerContext[object, object]


class RoguePeer(NoLeases, pb_grpc.PeerServicer):
    """`async with RoguePeer(files) as rogue:` serves on `rogue.address` over mutual TLS. Lease
    RPCs are not what it lies about: NoLeases answers them UNIMPLEMENTED."""

    def __init__(self, files: TlsFiles, registry_port: int = 6443) -> None:
        # Its own ID (its certificate's): any other is refused; a test may still set one to
        # see what honest nodes do with the answers.
        self.node_id = node_id_of_certificate(files.cert_file.read_bytes())
        self.registry_port = registry_port
        # Contacts returned as providers of every key asked for.
        self.poison: list[pb.Contact] = []
        # Contacts returned as the closest nodes to every target asked for.
        self.nodes: list[pb.Contact] = []
        self.asked: list[bytes] = []
        self._server = GrpcServer(
            "127.0.0.1:0", name="rogue-peer", credentials=grpc_server_credentials(files)
        )
        self._server.add_service(
            SERVICE_NAME, lambda s: pb_grpc.add_PeerServicer_to_server(self, s)
        )

    @property
    def address(self) -> str:
        return self._server.bound_address

    def _me(self) -> pb.SenderInfo:
        return pb.SenderInfo(
            node_id=self.node_id,
            discovery_port=self._server.port,
            registry_port=self.registry_port,
        )

    async def Ping(self, request: pb.PingRequest, context: Context) -> pb.PingResponse:
        return pb.PingResponse(responder=self._me(), observed_address="127.0.0.1")

    async def FindNode(self, request: pb.FindNodeRequest, context: Context) -> pb.FindNodeResponse:
        return pb.FindNodeResponse(closest=self.nodes)

    async def GetProviders(
        self, request: pb.GetProvidersRequest, context: Context
    ) -> pb.GetProvidersResponse:
        self.asked.append(request.key)
        return pb.GetProvidersResponse(providers=[pb.Provider(node=c) for c in self.poison])

    async def AddProvider(
        self, request: pb.AddProviderRequest, context: Context
    ) -> pb.AddProviderResponse:
        return pb.AddProviderResponse(stored=len(request.keys))

    async def RemoveProvider(
        self, request: pb.RemoveProviderRequest, context: Context
    ) -> pb.RemoveProviderResponse:
        return pb.RemoveProviderResponse(removed=0)

    async def __aenter__(self) -> RoguePeer:
        await self._server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._server.stop(None)
