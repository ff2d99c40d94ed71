"""The deciding node's answers to peers' lease RPCs.

Kept out of the Peer servicer so that class only checks the caller and delegates; a refusal
is raised as the error kind it is (the table's, InvalidArgumentError) and answered with its
status by the server's interceptor.
"""

from __future__ import annotations

from collections.abc import Callable

from services.common.errors import InvalidArgumentError
from services.common.genproto.peermirror.discovery.v1 import peer_pb2 as pb
from services.discovery.kademlia import Contact
from services.discovery.kademlia.leases import FetchLease, LeaseTable, same_node
from services.discovery.wire import contact_to_proto, duration, seconds


def _ttl(request: pb.PeerLeaseRequest) -> float:
    ttl = seconds(request.ttl) if request.HasField("ttl") else 0.0
    if ttl < 0:
        raise InvalidArgumentError("must not be negative", field="ttl")
    return ttl


class LeaseAuthority:
    """This node as the one deciding on the leases of keys it is closest to."""

    def __init__(self, table: LeaseTable, clock: Callable[[], float]) -> None:
        self.table = table
        self._clock = clock

    def _state(self, caller: Contact, lease: FetchLease | None) -> pb.PeerLeaseState:
        if lease is None:
            return pb.PeerLeaseState()
        return pb.PeerLeaseState(
            granted=same_node(lease.holder, caller),
            holder=contact_to_proto(lease.holder),
            ttl=duration(lease.ttl(self._clock())),
            waiters=self.table.waiters(lease.key, lease.holder.node_id),
        )

    def acquire_state(self, caller: Contact, request: pb.PeerLeaseRequest) -> pb.PeerLeaseState:
        """AcquireLease: the caller's new lease, or the other holder's."""
        grant = self.table.acquire(
            request.key, caller, _ttl(request), self._clock(), request.max_waiters
        )
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
