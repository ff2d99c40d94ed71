"""A node-local LocalDiscovery on a real loopback gRPC port, with no DHT behind it.

One fake for both clients of the node-local API:
- the pinner advertises and withdraws keys: the fake keeps the advertised set as the real
  service does, can be stopped and started again on the same port losing that set (a
  discovery restart), and lets a test wait for the set to change;
- the registry looks providers up: FindProviders answers from a table the test fills (real
  registries on loopback ports, or fault proxies in front of them), recording each lookup, and
  ListPeers names every provider in the table as a routing-table entry (the status page's peer
  list). With an empty table nobody provides anything, as for a single node.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Callable

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from services.common.genproto.peermirror.discovery.v1 import local_pb2, local_pb2_grpc, peer_pb2
from services.common.grpc_server import GrpcServer
from tests.harness.peer_stubs import NoLocalLeases

# Sent per ListAdvertised message, small so tests cover the multi-batch case.
LIST_BATCH = 100

Context = grpc.aio.ServicerContext[object, object]


class _Servicer(NoLocalLeases, local_pb2_grpc.LocalDiscoveryServicer):
    def __init__(self, owner: FakeDiscovery) -> None:
        self._owner = owner

    # --- what the pinner calls ---

    async def Advertise(
        self, request: local_pb2.AdvertiseRequest, context: Context
    ) -> local_pb2.AdvertiseResponse:
        keys = self._owner.keys
        before = len(keys)
        keys.update(request.keys)
        self._owner.calls.append(("advertise", tuple(request.keys)))
        self._owner.notify()
        return local_pb2.AdvertiseResponse(added=len(keys) - before, total=len(keys))

    async def Withdraw(
        self, request: local_pb2.WithdrawRequest, context: Context
    ) -> local_pb2.WithdrawResponse:
        keys = self._owner.keys
        before = len(keys)
        keys.difference_update(request.keys)
        self._owner.calls.append(("withdraw", tuple(request.keys)))
        self._owner.notify()
        return local_pb2.WithdrawResponse(removed=before - len(keys), total=len(keys))

    async def ListAdvertised(
        self, request: local_pb2.ListAdvertisedRequest, context: Context
    ) -> AsyncIterator[local_pb2.ListAdvertisedResponse]:
        ordered = sorted(self._owner.keys)
        for i in range(0, len(ordered), LIST_BATCH):
            yield local_pb2.ListAdvertisedResponse(keys=ordered[i : i + LIST_BATCH])

    async def Stats(
        self, request: local_pb2.StatsRequest, context: Context
    ) -> local_pb2.StatsResponse:
        started = Timestamp()
        started.FromNanoseconds(self._owner.started_ns)
        return local_pb2.StatsResponse(started_at=started, advertised_keys=len(self._owner.keys))

    # --- what the registry calls ---

    async def FindProviders(
        self, request: local_pb2.FindProvidersRequest, context: Context
    ) -> AsyncIterator[local_pb2.FindProvidersResponse]:
        owner = self._owner
        owner.lookups.append(request.key)
        contacts = owner.providers.get(request.key, [])
        limit = request.limit or len(contacts)
        for i, (address, port) in enumerate(contacts[:limit]):
            # A slow lookup, or one that finds more providers as it walks on: faults this fake
            # exists to inject.
            delay = owner.first_delay if i == 0 else owner.later_delay
            if delay:
                await asyncio.sleep(delay)
            yield local_pb2.FindProvidersResponse(provider=owner.contact(address, port))
        if owner.hold_open:
            # Like a lookup still walking the DHT: the stream stays open until the caller
            # stops listening or its deadline passes.
            await asyncio.Event().wait()

    async def ListPeers(
        self, request: local_pb2.ListPeersRequest, context: Context
    ) -> local_pb2.ListPeersResponse:
        owner = self._owner
        contacts = sorted({c for listed in owner.providers.values() for c in listed})
        return local_pb2.ListPeersResponse(
            peers=[local_pb2.PeerState(contact=owner.contact(*c)) for c in contacts]
        )


class FakeDiscovery:
    """`async with FakeDiscovery() as d:` serves on `d.address` until the block ends.

    `providers[key]` lists (address, registry_port) in the order they are streamed;
    `first_delay` delays the first one, `later_delay` each of the others; `hold_open` keeps
    streams open after the last one. A
    contact's node ID is derived from its address and port unless `node_ids` names one (two
    contacts of one node: the same ID at two ports). `keys` is the advertised set, `calls` the
    pinner's Advertise and Withdraw calls in order.
    """

    def __init__(self, port: int = 0) -> None:
        self._port = port
        self.keys: set[str] = set()
        self.calls: list[tuple[str, tuple[str, ...]]] = []
        self.started_ns = 0
        self.providers: dict[str, list[tuple[str, int]]] = {}
        self.lookups: list[str] = []
        self.first_delay = 0.0
        self.later_delay = 0.0
        self.hold_open = False
        self.node_ids: dict[tuple[str, int], bytes] = {}
        self._server: GrpcServer | None = None
        self._changed = asyncio.Event()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self._port}"

    def notify(self) -> None:
        self._changed.set()

    def node_id(self, address: str, port: int) -> bytes:
        named = self.node_ids.get((address, port))
        return named if named is not None else hashlib.sha256(f"{address}:{port}".encode()).digest()

    def contact(self, address: str, port: int) -> peer_pb2.Contact:
        return peer_pb2.Contact(
            node_id=self.node_id(address, port), address=address, registry_port=port
        )

    def provide(self, keys: list[str], *peers: tuple[str, int]) -> None:
        """Make every key in `keys` provided by `peers`, in that order."""
        for key in keys:
            self.providers[key] = list(peers)

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
