"""The node's one client of discovery: a Router protocol and its gRPC implementation."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc

from services.common.errors import UnavailableError
from services.common.genproto.peermirror.discovery.v1 import local_pb2, local_pb2_grpc
from services.common.grpc_channel import channel_options
from services.common.hostport import join_host_port
from services.common.request_id import outgoing_metadata

# Seconds a unary call to the node-local API may take (the API answers from memory or a few
# DHT round trips; a hung discovery must not hold a request or a lease decision longer).
CALL_TIMEOUT_S = 2.0
# RenewLease's and ReleaseLease's answers when the lease is no longer ours.
_NOT_OURS = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND)


def local_channel_options(max_message_bytes: int | None = None) -> list[tuple[str, int]]:
    """The one set of options every channel to the LocalDiscovery API uses: a restarted
    discovery is found again within a second."""
    return channel_options(max_message_bytes, reconnect_ms=(100, 1000))


@dataclass(frozen=True, slots=True)
class Provider:
    """A provider as discovery names it (not yet checked to be dialable)."""

    address: str
    registry_port: int
    node_id: bytes = b""


@dataclass(frozen=True, slots=True)
class Holder:
    """The node that holds a fetch lease: where its registry answers peer requests."""

    address: str
    registry_port: int

    def __str__(self) -> str:
        return join_host_port(self.address, self.registry_port)


@dataclass(frozen=True, slots=True)
class LeaseAnswer:
    """Discovery's answer to a lease request: granted to us, or held by `holder`."""

    granted: bool
    holder: Holder | None = None
    # Seconds the lease lasts unless renewed (granted answers only).
    ttl: float = 0.0


@dataclass(frozen=True, slots=True)
class RouterState:
    """What discovery says of itself: when it started and how many keys it advertises."""

    started_at: tuple[int, int]
    advertised_keys: int


class LookupFailed(UnavailableError):
    """A provider lookup ended with an error other than its deadline (message says why)."""


class Router(Protocol):
    """Discovery as the registry, the pinner and the CLI use it. Transport failures raise
    (grpc.aio.AioRpcError from the gRPC router) unless a method says otherwise."""

    def lookup(self, key: str, *, limit: int, deadline: float) -> AsyncGenerator[Provider, None]:
        """Providers of `key` as they are found: at most `limit`, for at most `deadline`
        seconds (the deadline ends the stream quietly; other failures raise LookupFailed)."""
        ...

    async def advertise(self, keys: Sequence[str]) -> None:
        """Start providing `keys`."""
        ...

    async def withdraw(self, keys: Sequence[str]) -> None:
        """Stop providing `keys`."""
        ...

    async def list_advertised(self) -> set[str]:
        """Every key this node advertises."""
        ...

    async def state(self) -> RouterState | None:
        """Discovery's start time and key count; None when it cannot tell."""
        ...

    async def acquire(self, key: str, max_waiters: int = 0) -> LeaseAnswer:
        """Ask for the fetch lease on `key`, or for the holder to wait for: one that serves at
        most `max_waiters` other nodes (0: no bound; past it this node gets a lease too)."""
        ...

    async def renew(self, key: str) -> bool:
        """Extend our lease on `key`; False when it is no longer ours."""
        ...

    async def release(self, key: str) -> None:
        """Give our lease on `key` back so a later miss can take it at once."""
        ...

    async def close(self) -> None:
        """Drop the connection (idempotent; the next call opens it again)."""
        ...


class GrpcRouter:
    """The Router over the LocalDiscovery API at `address`, its channel opened on first use."""

    def __init__(
        self,
        address: str,
        max_message_bytes: int | None = None,
        *,
        call_timeout: float = CALL_TIMEOUT_S,
    ) -> None:
        self.address = address
        self._timeout = call_timeout
        self._options = local_channel_options(max_message_bytes)
        self._channel: grpc.aio.Channel | None = None
        self._stub: local_pb2_grpc.LocalDiscoveryAsyncStub | None = None

    def _open(self) -> local_pb2_grpc.LocalDiscoveryAsyncStub:
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(self.address, options=self._options)
            self._stub = local_pb2_grpc.LocalDiscoveryStub(self._channel)
        return self._stub

    async def close(self) -> None:
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close()

    async def lookup(
        self, key: str, *, limit: int, deadline: float
    ) -> AsyncGenerator[Provider, None]:
        call = self._open().FindProviders(
            local_pb2.FindProvidersRequest(key=key, limit=limit),
            timeout=deadline,
            # The request id lets discovery's log line be matched to the caller's.
            metadata=outgoing_metadata() or None,
        )
        try:
            async for response in call:
                contact = response.provider
                yield Provider(contact.address, contact.registry_port, contact.node_id)
        except grpc.aio.AioRpcError as err:
            if err.code() is not grpc.StatusCode.DEADLINE_EXCEEDED:
                raise LookupFailed(f"discovery: {err.code().name}: {err.details()}") from err
        finally:
            call.cancel()

    async def advertise(self, keys: Sequence[str]) -> None:
        await self._open().Advertise(
            local_pb2.AdvertiseRequest(keys=list(keys)), timeout=self._timeout
        )

    async def withdraw(self, keys: Sequence[str]) -> None:
        await self._open().Withdraw(
            local_pb2.WithdrawRequest(keys=list(keys)), timeout=self._timeout
        )

    async def list_advertised(self) -> set[str]:
        keys: set[str] = set()
        call = self._open().ListAdvertised(local_pb2.ListAdvertisedRequest(), timeout=self._timeout)
        async for response in call:
            keys.update(response.keys)
        return keys

    async def state(self) -> RouterState | None:
        try:
            stats = await self._open().Stats(local_pb2.StatsRequest(), timeout=self._timeout)
        except grpc.aio.AioRpcError as err:
            if err.code() is grpc.StatusCode.UNIMPLEMENTED:
                return None
            raise
        started = (stats.started_at.seconds, stats.started_at.nanos)
        return RouterState(started_at=started, advertised_keys=stats.advertised_keys)

    async def acquire(self, key: str, max_waiters: int = 0) -> LeaseAnswer:
        reply = await self._open().AcquireLease(
            local_pb2.AcquireLeaseRequest(key=key, max_waiters=max_waiters),
            timeout=self._timeout,
        )
        ttl = reply.ttl.ToTimedelta().total_seconds()
        if reply.granted:
            return LeaseAnswer(granted=True, ttl=ttl)
        holder = None
        if reply.HasField("holder") and reply.holder.address and reply.holder.registry_port:
            holder = Holder(reply.holder.address, reply.holder.registry_port)
        return LeaseAnswer(granted=False, holder=holder, ttl=ttl)

    async def renew(self, key: str) -> bool:
        try:
            await self._open().RenewLease(
                local_pb2.RenewLeaseRequest(key=key), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _NOT_OURS:
                return False
            raise
        return True

    async def release(self, key: str) -> None:
        try:
            await self._open().ReleaseLease(
                local_pb2.ReleaseLeaseRequest(key=key), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in _NOT_OURS:
                raise
