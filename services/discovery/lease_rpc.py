"""The deciding node's answers to peers' lease RPCs, and the status each refusal maps to.

Kept out of the Peer servicer so that class only checks the caller and delegates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NoReturn, TypeVar

import grpc

from services.common.genproto.peermirror.discovery.v1 import peer_pb2 as pb
from services.discovery.kademlia import Contact
from services.discovery.kademlia.leases import (
    Lease,
    LeaseCapReached,
    LeaseError,
    LeaseHeldElsewhere,
    LeaseTable,
    NoLease,
    same_node,
)
from services.discovery.wire import InvalidRequest, contact_to_proto, duration, seconds

R = TypeVar("R")

Context = grpc.aio.ServicerContext[object, object]


def lease_status(exc: LeaseError) -> tuple[grpc.StatusCode, str]:
    """The gRPC status a table refusal is answered with, message naming the field."""
    if isinstance(exc, LeaseHeldElsewhere):
        return grpc.StatusCode.PERMISSION_DENIED, f"key: {exc}"
    if isinstance(exc, NoLease):
        return grpc.StatusCode.NOT_FOUND, f"key: {exc}"
    if isinstance(exc, LeaseCapReached):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"key: {exc}"
    return grpc.StatusCode.FAILED_PRECONDITION, f"key: {exc}"


async def serve_lease(context: Context, answer: Callable[[], R]) -> R:
    """`answer()`, its refusals turned into the matching status."""
    try:
        return answer()
    except InvalidRequest as exc:
        await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    except LeaseError as exc:
        await _abort(context, *lease_status(exc))


async def _abort(context: Context, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


def _ttl(request: pb.PeerLeaseRequest) -> float:
    ttl = seconds(request.ttl) if request.HasField("ttl") else 0.0
    if ttl < 0:
        raise InvalidRequest("ttl", "must not be negative")
    return ttl


class LeaseAuthority:
    """This node as the one deciding on the leases of keys it is closest to."""

    def __init__(self, table: LeaseTable, clock: Callable[[], float]) -> None:
        self.table = table
        self._clock = clock

    def _state(self, caller: Contact, lease: Lease | None) -> pb.PeerLeaseState:
        if lease is None:
            return pb.PeerLeaseState()
        return pb.PeerLeaseState(
            granted=same_node(lease.holder, caller),
            holder=contact_to_proto(lease.holder),
            ttl=duration(lease.ttl(self._clock())),
            waiters=self.table.waiters(lease.key),
        )

    def acquire_state(self, caller: Contact, request: pb.PeerLeaseRequest) -> pb.PeerLeaseState:
        """AcquireLease: the caller's new lease, or the other holder's."""
        grant = self.table.acquire(request.key, caller, _ttl(request), self._clock())
        return self._state(caller, grant.lease)

    def renew_state(self, caller: Contact, request: pb.PeerLeaseRequest) -> pb.PeerLeaseState:
        """RenewLease: the caller's lease, extended."""
        return self._state(
            caller, self.table.renew(request.key, caller, _ttl(request), self._clock())
        )

    def release_state(self, caller: Contact, key: bytes) -> pb.PeerLeaseReleased:
        """ReleaseLease."""
        return pb.PeerLeaseReleased(released=self.table.release(key, caller, self._clock()))

    def get_state(self, caller: Contact, key: bytes) -> pb.PeerLeaseState:
        """GetLease."""
        return self._state(caller, self.table.get(key, self._clock()))
