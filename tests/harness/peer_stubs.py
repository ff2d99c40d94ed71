"""Peer-service stand-ins for fault injection: lease RPCs a fake peer does not serve."""

from __future__ import annotations

import grpc

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
