"""The node's LocalDiscovery API as the coordinator's lease client and advertiser.

Fetch leases (AcquireLease, RenewLease, ReleaseLease) are decided by the DHT nodes closest to
the key; this node's discovery asks them. A digest being fetched for the cluster is advertised
as soon as the fetch starts, so nodes sent to this one as the lease holder find it as a
provider, and withdrawn when the fetch fails. Built on the relay's discovery client, so both
use one channel setup.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from services.common.genproto.peermirror.discovery.v1 import local_pb2
from services.registry.inflight.ports import Holder, LeaseAnswer
from services.registry.mirror.providers import DiscoveryClient

CALL_TIMEOUT_S = 2.0
# RenewLease's and ReleaseLease's answers when the lease is no longer ours.
_NOT_OURS = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND)


class LocalDiscoveryPorts(DiscoveryClient):
    """LeaseClient and Advertiser over the LocalDiscovery API at `address`."""

    async def acquire(self, key: str) -> LeaseAnswer:
        reply = await self._open().AcquireLease(
            local_pb2.AcquireLeaseRequest(key=key), timeout=CALL_TIMEOUT_S
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
                local_pb2.RenewLeaseRequest(key=key), timeout=CALL_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _NOT_OURS:
                return False
            raise
        return True

    async def release(self, key: str) -> None:
        try:
            await self._open().ReleaseLease(
                local_pb2.ReleaseLeaseRequest(key=key), timeout=CALL_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in _NOT_OURS:
                raise

    async def advertise(self, keys: Sequence[str]) -> None:
        await self._open().Advertise(
            local_pb2.AdvertiseRequest(keys=list(keys)), timeout=CALL_TIMEOUT_S
        )

    async def withdraw(self, keys: Sequence[str]) -> None:
        await self._open().Withdraw(
            local_pb2.WithdrawRequest(keys=list(keys)), timeout=CALL_TIMEOUT_S
        )
