"""A LocalDiscovery whose FindProviders answers from a table the test fills, on a loopback port.

Registry mirror tests use it to name peers (real registries on loopback ports, or fault proxies
in front of them) without a DHT. FindProviders is served (lookups are recorded), and ListPeers
names every provider in the table as a routing-table entry (the status page's peer list).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import grpc

from services.common.genproto.peermirror.discovery.v1 import local_pb2, local_pb2_grpc, peer_pb2
from services.common.grpc_server import GrpcServer
from tests.harness.peer_stubs import NoLocalLeases


class _Servicer(NoLocalLeases, local_pb2_grpc.LocalDiscoveryServicer):
    def __init__(self, owner: FakeLocalDiscovery) -> None:
        self._owner = owner

    async def FindProviders(
        self,
        request: local_pb2.FindProvidersRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[local_pb2.FindProvidersResponse]:
        owner = self._owner
        owner.lookups.append(request.key)
        contacts = owner.providers.get(request.key, [])
        limit = request.limit or len(contacts)
        for i, (address, port) in enumerate(contacts[:limit]):
            if i == 0 and owner.first_delay:
                # A slow lookup on purpose: the fault this fake exists to inject.
                await asyncio.sleep(owner.first_delay)
            yield local_pb2.FindProvidersResponse(
                provider=peer_pb2.Contact(
                    node_id=owner.node_id(address, port), address=address, registry_port=port
                )
            )
        if owner.hold_open:
            # Like a lookup still walking the DHT: the stream stays open until the caller
            # stops listening or its deadline passes.
            await asyncio.Event().wait()

    # The rest of the API is not part of what this fake stands in for.

    async def Advertise(
        self, request: local_pb2.AdvertiseRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> local_pb2.AdvertiseResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "fake: FindProviders only")

    async def Withdraw(
        self, request: local_pb2.WithdrawRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> local_pb2.WithdrawResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "fake: FindProviders only")

    async def ListAdvertised(
        self,
        request: local_pb2.ListAdvertisedRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[local_pb2.ListAdvertisedResponse]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "fake: FindProviders only")
        yield local_pb2.ListAdvertisedResponse()  # unreachable: makes this a stream handler

    async def ListPeers(
        self, request: local_pb2.ListPeersRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> local_pb2.ListPeersResponse:
        owner = self._owner
        contacts = sorted({c for listed in owner.providers.values() for c in listed})
        return local_pb2.ListPeersResponse(
            peers=[
                local_pb2.PeerState(
                    contact=peer_pb2.Contact(
                        node_id=owner.node_id(address, port), address=address, registry_port=port
                    )
                )
                for address, port in contacts
            ]
        )

    async def Stats(
        self, request: local_pb2.StatsRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> local_pb2.StatsResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "fake: FindProviders only")


class FakeLocalDiscovery:
    """`async with FakeLocalDiscovery() as d:` serves on `d.address`.

    `providers[key]` lists (address, registry_port) in the order they are streamed;
    `first_delay` delays the first one; `hold_open` keeps streams open after the last one. A
    contact's node ID is derived from its address and port unless `node_ids` names one (two
    contacts of one node: the same ID at two ports).
    """

    def __init__(self) -> None:
        self.providers: dict[str, list[tuple[str, int]]] = {}
        self.lookups: list[str] = []
        self.first_delay = 0.0
        self.hold_open = False
        self.node_ids: dict[tuple[str, int], bytes] = {}
        self._server: GrpcServer | None = None
        self._port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self._port}"

    def node_id(self, address: str, port: int) -> bytes:
        named = self.node_ids.get((address, port))
        return named if named is not None else hashlib.sha256(f"{address}:{port}".encode()).digest()

    def provide(self, keys: list[str], *peers: tuple[str, int]) -> None:
        """Make every key in `keys` provided by `peers`, in that order."""
        for key in keys:
            self.providers[key] = list(peers)

    async def __aenter__(self) -> FakeLocalDiscovery:
        server = GrpcServer("127.0.0.1:0", name="fake-local-discovery")
        servicer = _Servicer(self)
        server.add_service(
            local_pb2.DESCRIPTOR.services_by_name["LocalDiscovery"].full_name,
            lambda s: local_pb2_grpc.add_LocalDiscoveryServicer_to_server(servicer, s),
        )
        self._port = await server.start()
        self._server = server
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            await self._server.stop(grace=None)
            self._server = None
