"""Introspection: the stats object maps one-to-one onto the proto's StatsResponse."""

from __future__ import annotations

from services.common.genproto.peermirror.registry.v1 import introspection_pb2 as pb
from services.registry.introspection import stats_response
from services.registry.stats import RegistryStats, RequestKind, Result


def test_stats_response_mirrors_the_counters() -> None:
    stats = RegistryStats()
    for kind, result, peer in [
        (RequestKind.BLOB, Result.LOCAL_HIT, False),
        (RequestKind.BLOB, Result.LOCAL_HIT, False),
        (RequestKind.MANIFEST, Result.REFUSED, True),
    ]:
        stats.begin()
        stats.end(kind, result, peer)
    stats.begin()
    stats.bytes_served_local = 1234
    reply = stats_response(stats)
    counts = {(c.kind, c.result, c.from_peer): c.count for c in reply.requests}
    assert counts == {
        (pb.REQUEST_KIND_BLOB, pb.REQUEST_RESULT_LOCAL_HIT, False): 2,
        (pb.REQUEST_KIND_MANIFEST, pb.REQUEST_RESULT_REFUSED, True): 1,
    }
    assert (reply.bytes_served_local, reply.bytes_relayed, reply.in_flight) == (1234, 0, 1)
    assert abs(reply.started_at.ToNanoseconds() / 1e9 - stats.started_at) < 1e-3
