"""Discovery stand-ins for fault injection: the lease RPCs a fake Peer or LocalDiscovery servicer
does not serve."""

from __future__ import annotations

import grpc

from services.common.genproto.peermirror.discovery.v1 import local_pb2
from services.common.genproto.peermirror.discovery.v1 import peer_pb2 as pb

Context = grpc.aio.ServicerContext[object, object]


class NoLeases:
    """The four lease RPCs answered UNIMPLEMENTED, as a node of an older version would: mixed
    into fake Peer servicers that are about something else."""

    async def AcquireLease(
        self, request: pb.PeerLeaseRequest, context: Context
    ) -> pb.PeerLeaseState:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no fetch leases here")

    async def RenewLease(self, request: pb.PeerLeaseRequest, context: Context) -> pb.PeerLeaseState:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no fetch leases here")

    async def ReleaseLease(
        self, request: pb.PeerLeaseKey, context: Context
    ) -> pb.PeerLeaseReleased:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no fetch leases here")

    async def GetLease(self, request: pb.PeerLeaseKey, context: Context) -> pb.PeerLeaseState:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no fetch leases here")


class NoLocalLeases:
    """LocalDiscovery's four lease RPCs answered UNIMPLEMENTED, for fakes of the node-local API
    that are about lookups and advertising."""

    async def AcquireLease(
        self, request: local_pb2.AcquireLeaseRequest, context: Context
    ) -> local_pb2.AcquireLeaseResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "fake: no fetch leases")

    async def RenewLease(
        self, request: local_pb2.RenewLeaseRequest, context: Context
    ) -> local_pb2.RenewLeaseResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "fake: no fetch leases")

    async def ReleaseLease(
        self, request: local_pb2.ReleaseLeaseRequest, context: Context
    ) -> local_pb2.ReleaseLeaseResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "fake: no fetch leases")

    async def GetLease(
        self, request: local_pb2.GetLeaseRequest, context: Context
    ) -> local_pb2.GetLeaseResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "fake: no fetch leases")
