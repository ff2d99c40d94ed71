"""An in-memory LocalDiscovery on a real loopback gRPC port, for pinner tests (no DHT behind it).

It keeps the advertised key set like the real service's node-local API does, and can be
stopped and started again on the same port losing that set (a discovery restart), or be made
to fail calls (discovery unreachable).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from services.common.genproto.peermirror.discovery.v1 import local_pb2, local_pb2_grpc
from services.common.grpc_server import GrpcServer
from tests.harness.peer_stubs import NoLocalLeases

# Sent per ListAdvertised message, small so tests cover the multi-batch case.
LIST_BATCH = 100


class _Servicer(NoLocalLeases, local_pb2_grpc.LocalDiscoveryServicer):
    def __init__(self, owner: FakeDiscovery) -> None:
        self._owner = owner

    async def Advertise(
        self, request: local_pb2.AdvertiseRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> local_pb2.AdvertiseResponse:
        keys = self._owner.keys
        before = len(keys)
        keys.update(request.keys)
        self._owner.calls.append(("advertise", tuple(request.keys)))
        self._owner.notify()
        return local_pb2.AdvertiseResponse(added=len(keys) - before, total=len(keys))

    async def Withdraw(
        self, request: local_pb2.WithdrawRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> local_pb2.WithdrawResponse:
        keys = self._owner.keys
        before = len(keys)
        keys.difference_update(request.keys)
        self._owner.calls.append(("withdraw", tuple(request.keys)))
        self._owner.notify()
        return local_pb2.WithdrawResponse(removed=before - len(keys), total=len(keys))

    async def ListAdvertised(
        self,
        request: local_pb2.ListAdvertisedRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[local_pb2.ListAdvertisedResponse]:
        ordered = sorted(self._owner.keys)
        for i in range(0, len(ordered), LIST_BATCH):
            yield local_pb2.ListAdvertisedResponse(keys=ordered[i : i + LIST_BATCH])

    async def Stats(
        self, request: local_pb2.StatsRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> local_pb2.StatsResponse:
        started = Timestamp()
        started.FromNanoseconds(self._owner.started_ns)
        return local_pb2.StatsResponse(started_at=started, advertised_keys=len(self._owner.keys))

    async def FindProviders(
        self,
        request: local_pb2.FindProvidersRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[local_pb2.FindProvidersResponse]:
        # A single node: nobody else ever provides anything.
        for _ in ():
            yield local_pb2.FindProvidersResponse()

    async def ListPeers(
        self, request: local_pb2.ListPeersRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> local_pb2.ListPeersResponse:
        return local_pb2.ListPeersResponse()


class FakeDiscovery:
    """`async with FakeDiscovery() as d:` serves on `d.address` until the block ends."""

    def __init__(self, port: int = 0) -> None:
        self._port = port
        self.keys: set[str] = set()
        self.calls: list[tuple[str, tuple[str, ...]]] = []
        self.started_ns = 0
        self._server: GrpcServer | None = None
        self._changed = asyncio.Event()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self._port}"

    def notify(self) -> None:
        self._changed.set()

    async def start(self) -> None:
        """Serve (again) on the same port with an empty key set, like a restarted service."""
        self.keys = set()
        self.started_ns = time.time_ns()
        server = GrpcServer(f"127.0.0.1:{self._port}", name="fake-discovery")
        servicer = _Servicer(self)
        server.add_service(
            local_pb2.DESCRIPTOR.services_by_name["LocalDiscovery"].full_name,
            lambda s: local_pb2_grpc.add_LocalDiscoveryServicer_to_server(servicer, s),
        )
        self._port = await server.start()
        self._server = server

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=None)
            self._server = None

    async def __aenter__(self) -> FakeDiscovery:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_for(self, condition: Callable[[set[str]], bool]) -> None:
        """Return once `condition(keys)` holds (bound it with `asyncio.timeout`)."""
        while not condition(self.keys):
            self._changed.clear()
            await self._changed.wait()
