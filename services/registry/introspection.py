"""The RegistryIntrospection gRPC service: a thin adapter from RegistryStats to the proto."""

from __future__ import annotations

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from services.common.genproto.peermirror.registry.v1 import (
    introspection_pb2 as pb,
)
from services.common.genproto.peermirror.registry.v1 import (
    introspection_pb2_grpc as pb_grpc,
)
from services.common.grpc_server import GrpcServer
from services.registry.stats import RegistryStats, RequestKind, Result

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["RegistryIntrospection"].full_name

_KINDS = {
    RequestKind.MANIFEST: pb.REQUEST_KIND_MANIFEST,
    RequestKind.BLOB: pb.REQUEST_KIND_BLOB,
    RequestKind.OTHER: pb.REQUEST_KIND_OTHER,
}
_RESULTS = {
    Result.LOCAL_HIT: pb.REQUEST_RESULT_LOCAL_HIT,
    Result.PEER_HIT: pb.REQUEST_RESULT_PEER_HIT,
    Result.NOT_FOUND: pb.REQUEST_RESULT_NOT_FOUND,
    Result.REFUSED: pb.REQUEST_RESULT_REFUSED,
    Result.CLIENT_ERROR: pb.REQUEST_RESULT_CLIENT_ERROR,
    Result.ERROR: pb.REQUEST_RESULT_ERROR,
}


def stats_response(stats: RegistryStats) -> pb.StatsResponse:
    """The proto form of `stats`, one RequestCount per counter seen, in a stable order."""
    started = Timestamp()
    started.FromNanoseconds(int(stats.started_at * 1e9))
    counts = [
        pb.RequestCount(
            kind=_KINDS[key.kind], result=_RESULTS[key.result], from_peer=key.from_peer, count=n
        )
        for key, n in sorted(
            stats.requests.items(),
            key=lambda item: (item[0].kind.value, item[0].result.value, item[0].from_peer),
        )
    ]
    return pb.StatsResponse(
        started_at=started,
        requests=counts,
        bytes_served_local=stats.bytes_served_local,
        bytes_relayed=stats.bytes_relayed,
        in_flight=max(0, stats.in_flight),
    )


class IntrospectionServicer(pb_grpc.RegistryIntrospectionServicer):
    """Answers Stats from the live counters."""

    def __init__(self, stats: RegistryStats) -> None:
        self._stats = stats

    async def Stats(
        self, request: pb.StatsRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.StatsResponse:
        return stats_response(self._stats)


def register(server: GrpcServer, stats: RegistryStats) -> None:
    """Add the introspection service over `stats` to `server` (before it starts)."""
    servicer = IntrospectionServicer(stats)
    server.add_service(
        SERVICE_NAME, lambda s: pb_grpc.add_RegistryIntrospectionServicer_to_server(servicer, s)
    )
