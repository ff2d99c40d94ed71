"""Calls to other discovery nodes, each reported to the Kademlia core as heard-from or failed.

Every call carries a deadline. Channels are cached per endpoint (a lookup talks to the same
few nodes again and again) and closed when the core drops the node behind them, or when the
cache is full and the channel is the least recently used.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import KW_ONLY, InitVar, dataclass, field
from typing import Any, TypeVar

import grpc

from services.common.cancellation import cancel_and_wait
from services.common.errors import error_for_status
from services.common.genproto.peermirror.discovery.v1 import peer_pb2 as pb
from services.common.genproto.peermirror.discovery.v1 import peer_pb2_grpc as pb_grpc
from services.common.grpc_channel import channel_options
from services.common.logsetup import get_logger
from services.discovery.bootstrap import BootstrapEndpoint
from services.discovery.identity import ServerIdentities
from services.discovery.kademlia import ID_BYTES, Contact, DhtNode, short_id
from services.discovery.wire import contacts_from_proto, duration, normalize_ip

R = TypeVar("R")

# A restarted peer is reachable again within a couple of seconds.
RECONNECT_MS = (200, 2000)
# Nodes whose own answer to a ping is kept (beyond the routing table, whose buckets may be
# full), so calls to them need no new ping to learn their ports.
ANSWERED_KEPT = 1024
# Open channels kept; beyond it the least recently used one is closed.
MAX_CHANNELS = 512
# How long close() waits for cancelled background calls before closing channels under them.
CLOSE_WAIT = 1.0

log = get_logger(__name__)


# Statuses a live peer answers with on purpose ("no", "not yours", "full"): the call reached
# the node, so they are no liveness failure. Anything else (unavailable, deadline) is.
ANSWERED_STATUSES = frozenset(
    {
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)


@dataclass(frozen=True, slots=True)
class ProvidersAnswer:
    """A GetProviders answer: providers named and closer contacts."""

    providers: list[Contact]
    closer: list[Contact]


@dataclass(frozen=True, slots=True)
class PingAnswer:
    """Who answered a ping and the address it saw us call from."""

    responder: Contact
    observed_address: str | None


@dataclass(eq=False)
class PeerServiceClient:
    """Issues Peer RPCs for one node; reports every outcome to its DhtNode."""

    node: DhtNode
    sender: Callable[[], pb.SenderInfo]
    _: KW_ONLY
    rpc_timeout: float
    probe_timeout: float
    clock: Callable[[], float]
    on_dropped: Callable[[bytes], None] | None = None
    on_heard: Callable[[bytes], None] | None = None
    max_channels: int = MAX_CHANNELS
    # Mutual TLS (tls.enabled): every channel presents this node's certificate and accepts
    # only a peer certificate from the cluster CA naming the IP address dialled.
    credentials: grpc.ChannelCredentials | None = None
    # grpc.max_message_bytes bounds what we accept from peers as it bounds what they may
    # send our server (gRPC's own default is 4 MiB); None keeps that key's default.
    max_message_bytes: InitVar[int | None] = None
    # Mutual TLS: a ping answer is believed only from the node its certificate makes it.
    server_identities: ServerIdentities | None = None
    refused_answers: int = field(default=0, init=False)
    calls: int = field(default=0, init=False)
    failures: int = field(default=0, init=False)

    def __post_init__(self, max_message_bytes: int | None) -> None:
        self._options = channel_options(max_message_bytes, reconnect_ms=RECONNECT_MS)
        self._channels: OrderedDict[str, tuple[grpc.aio.Channel, pb_grpc.PeerAsyncStub]] = (
            OrderedDict()
        )
        self._ids_at: dict[str, set[bytes]] = {}  # endpoint -> node IDs called there
        self._endpoint_of: dict[bytes, str] = {}
        # Nodes as they last answered a ping themselves (ports they declared), newest last.
        self._answered: OrderedDict[bytes, Contact] = OrderedDict()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- liveness bookkeeping ---------------------------------------------------------

    def heard_from(self, contact: Contact) -> None:
        """A node called or answered us; runs the ping-before-evict the core may ask for."""
        if self.on_heard is not None:
            self.on_heard(contact.node_id)
        to_ping = self.node.heard_from(contact, self.clock())
        if to_ping is not None:
            self.spawn(self.ping(to_ping))

    def node_dropped(self, node_id: bytes) -> None:
        """The core dropped a node: close its channel unless another node shares it."""
        endpoint = self._endpoint_of.pop(node_id, None)
        if endpoint is None:
            return
        ids = self._ids_at.get(endpoint)
        if ids is not None:
            ids.discard(node_id)
            if ids:
                return
        self._close_channel(endpoint)

    def _failed_at(self, contact: Contact) -> None:
        """A call to `contact` failed. It counts against the node only at the endpoint we
        know it by (or when we know none): another node may name it anywhere, and a call
        failing there says nothing about the node itself."""
        node_id = contact.node_id
        known = (
            self.node.table.get(node_id)
            or self.node.store.contact_of(node_id)
            or self._answered.get(node_id)
        )
        if known is not None and known.discovery_endpoint != contact.discovery_endpoint:
            self.failures += 1
            return
        self._failed(node_id)

    def _failed(self, node_id: bytes) -> None:
        self.failures += 1
        if self.node.rpc_failed(node_id, self.clock()):
            self.node_dropped(node_id)
            if self.on_dropped is not None:
                self.on_dropped(node_id)

    # -- RPCs -------------------------------------------------------------------------

    async def ping(self, contact: Contact) -> bool:
        """Liveness probe of a known node (deadline probe_timeout); True when it answered
        as the node we know. Answering with another ID means our node is gone from there."""
        return await self.ping_as(contact) is not None

    async def ping_as(self, contact: Contact) -> Contact | None:
        """`ping`, returning the node as it answered: the address dialled with the ports it
        declared itself (never those another node named); None when it did not answer as
        `contact.node_id`."""
        answer = await self._ping_endpoint(
            contact.discovery_endpoint, contact.address, contact.discovery_port
        )
        if answer is None or answer.responder.node_id != contact.node_id:
            self._failed_at(contact)
            if answer is not None:
                self.heard_from(answer.responder)
            return None
        self._note(contact)
        self._answered[contact.node_id] = answer.responder
        self._answered.move_to_end(contact.node_id)
        while len(self._answered) > ANSWERED_KEPT:
            self._answered.popitem(last=False)
        self.heard_from(answer.responder)
        return answer.responder

    async def ping_endpoint(self, endpoint: BootstrapEndpoint) -> PingAnswer | None:
        """Ping an address whose node we do not know yet (bootstrap); None on failure."""
        answer = await self._ping_endpoint(str(endpoint), endpoint.address, endpoint.port)
        if answer is not None:
            self._note(answer.responder)
            self.heard_from(answer.responder)
        return answer

    async def _ping_endpoint(self, endpoint: str, address: str, port: int) -> PingAnswer | None:
        if self._closed:
            return None
        stub = self._stub(endpoint)
        self.calls += 1
        try:
            reply: pb.PingResponse = await stub.Ping(
                pb.PingRequest(sender=self.sender()), timeout=self.probe_timeout
            )
        except grpc.aio.AioRpcError:
            return None
        r = reply.responder
        if (
            len(r.node_id) != ID_BYTES
            or not 1 <= r.discovery_port <= 65535
            or not 1 <= r.registry_port <= 65535
        ):
            return None
        if self.server_identities is not None and not await self.server_identities.confirm(
            address, port, r.node_id, self.probe_timeout
        ):
            self.refused_answers += 1
            log.info(
                "peer answered under a node ID its certificate does not give it; not believed",
                endpoint=endpoint,
                claimed=short_id(r.node_id),
            )
            return None
        responder = Contact(r.node_id, address, r.discovery_port, r.registry_port)
        return PingAnswer(responder, normalize_ip(reply.observed_address))

    async def find_node(self, contact: Contact, target: bytes) -> list[Contact] | None:
        """FindNode; None when the call failed."""
        request = pb.FindNodeRequest(sender=self.sender(), target=target)
        reply = await self._call(
            contact, lambda stub: stub.FindNode(request, timeout=self.rpc_timeout)
        )
        return None if reply is None else contacts_from_proto(reply.closest)

    async def get_providers(
        self, contact: Contact, key: bytes, limit: int
    ) -> ProvidersAnswer | None:
        """GetProviders; None when the call failed."""
        request = pb.GetProvidersRequest(sender=self.sender(), key=key, limit=limit)
        reply = await self._call(
            contact, lambda stub: stub.GetProviders(request, timeout=self.rpc_timeout)
        )
        if reply is None:
            return None
        named = contacts_from_proto([p.node for p in reply.providers if p.HasField("node")])
        return ProvidersAnswer(named, contacts_from_proto(reply.closer))

    async def add_provider(self, contact: Contact, keys: Sequence[bytes], ttl: float) -> int | None:
        """AddProvider; the number of records stored, None when the call failed."""
        request = pb.AddProviderRequest(sender=self.sender(), keys=keys, ttl=duration(ttl))
        reply = await self._call(
            contact, lambda stub: stub.AddProvider(request, timeout=self.rpc_timeout)
        )
        return None if reply is None else int(reply.stored)

    async def remove_provider(self, contact: Contact, keys: Sequence[bytes]) -> int | None:
        """RemoveProvider; the number of records removed, None when the call failed."""
        request = pb.RemoveProviderRequest(sender=self.sender(), keys=keys)
        reply = await self._call(
            contact, lambda stub: stub.RemoveProvider(request, timeout=self.rpc_timeout)
        )
        return None if reply is None else int(reply.removed)

    async def _call(
        self,
        contact: Contact,
        call: Callable[[pb_grpc.PeerAsyncStub], Awaitable[R]],
        refusals: frozenset[grpc.StatusCode] = frozenset(),
    ) -> R | None:
        """`call` on the contact's stub; None when it failed. A status in `refusals` is
        raised as its error kind instead (the node answered)."""
        if self._closed:
            return None
        stub = self._stub(contact.discovery_endpoint)
        self._note(contact)
        self.calls += 1
        try:
            reply = await call(stub)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code in refusals:
                self._answered_call(contact)
                raise error_for_status(code, exc.details() or "") from None
            # A node refusing load (its record rate, a size limit) answered: it is alive.
            if code is not grpc.StatusCode.RESOURCE_EXHAUSTED:
                self._failed_at(contact)
            return None
        self._answered_call(contact)
        return reply

    async def call_answered(
        self, contact: Contact, call: Callable[[pb_grpc.PeerAsyncStub], Awaitable[R]]
    ) -> R | None:
        """A call whose refusals carry meaning (lease RPCs): None when the node could not be
        reached (counted as a failure); raises the error kind of the status it answered a
        refusal with (error_for_status; counted as heard from)."""
        return await self._call(contact, call, ANSWERED_STATUSES)

    def _answered_call(self, contact: Contact) -> None:
        """`contact` answered a call. Its ports may be what another node named (a lookup
        learns contacts from answers), so it is remembered as it described itself: as known
        already at this endpoint, else after a ping it answers with its own ports."""
        own = self.node.table.get(contact.node_id) or self._answered.get(contact.node_id)
        if own is not None and own.discovery_endpoint == contact.discovery_endpoint:
            self.heard_from(own)
        else:
            self.spawn(self.ping(contact))

    # -- channels and tasks -----------------------------------------------------------

    def _note(self, contact: Contact) -> None:
        endpoint = contact.discovery_endpoint
        old = self._endpoint_of.get(contact.node_id)
        if old == endpoint:
            return
        if old is not None:
            self._ids_at.get(old, set()).discard(contact.node_id)
        self._endpoint_of[contact.node_id] = endpoint
        self._ids_at.setdefault(endpoint, set()).add(contact.node_id)

    def _stub(self, endpoint: str) -> pb_grpc.PeerAsyncStub:
        cached = self._channels.get(endpoint)
        if cached is not None:
            self._channels.move_to_end(endpoint)
            return cached[1]
        if self.credentials is None:
            channel = grpc.aio.insecure_channel(endpoint, options=self._options)
        else:
            channel = grpc.aio.secure_channel(endpoint, self.credentials, options=self._options)
        stub = pb_grpc.PeerStub(channel)
        self._channels[endpoint] = (channel, stub)
        while len(self._channels) > self.max_channels:
            oldest = next(iter(self._channels))
            self._close_channel(oldest)
        return stub

    def _close_channel(self, endpoint: str) -> None:
        cached = self._channels.pop(endpoint, None)
        for node_id in self._ids_at.pop(endpoint, set()):
            self._endpoint_of.pop(node_id, None)
        if cached is not None:
            # Not a spawn(): a close under way must finish even while we shut down.
            # Calls still in flight on it end by their own deadline, not by the close.
            grace = max(self.rpc_timeout, self.probe_timeout)
            task = asyncio.get_running_loop().create_task(cached[0].close(grace))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    @property
    def open_channels(self) -> int:
        """Number of cached channels."""
        return len(self._channels)

    def spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        """Runs `work` in the background, kept referenced until done, cancelled on close."""
        if self._closed:
            work.close()
            return
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Cancels background work and closes every channel."""
        self._closed = True
        await cancel_and_wait(list(self._tasks), within=CLOSE_WAIT, owner="discovery-peer-client")
        channels = [channel for channel, _stub in self._channels.values()]
        self._channels.clear()
        await asyncio.gather(
            *(c.close(None) for c in channels), *list(self._closing), return_exceptions=True
        )
