"""The LocalDiscovery gRPC service (node-local address only): a thin adapter over the engine."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from services.common.genproto.peermirror.discovery.v1 import local_pb2 as pb
from services.common.genproto.peermirror.discovery.v1 import local_pb2_grpc as pb_grpc
from services.common.logsetup import get_logger
from services.common.request_id import from_metadata
from services.discovery.engine import DiscoveryEngine
from services.discovery.metrics import DiscoveryMetrics
from services.discovery.wire import InvalidRequest, contact_to_proto

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["LocalDiscovery"].full_name

# Most keys in one Advertise/Withdraw call; longest key string accepted.
MAX_KEYS_PER_CALL = 10_000
MAX_KEY_LENGTH = 1024
# Keys per ListAdvertised message.
LIST_BATCH = 1000

Context = grpc.aio.ServicerContext[object, object]

log = get_logger("discovery.local")


def check_key(key: str, field: str) -> str:
    """A key string: a digest or reference, non-empty, printable, bounded."""
    if not key:
        raise InvalidRequest(field, "must not be empty")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidRequest(field, f"longer than {MAX_KEY_LENGTH} characters")
    if not key.isprintable() or any(ch.isspace() for ch in key):
        raise InvalidRequest(field, "must not contain whitespace or control characters")
    return key


def check_key_list(keys: Sequence[str]) -> list[str]:
    """The keys of an Advertise/Withdraw call."""
    if len(keys) > MAX_KEYS_PER_CALL:
        raise InvalidRequest("keys", f"at most {MAX_KEYS_PER_CALL} keys per call, got {len(keys)}")
    return [check_key(key, f"keys[{i}]") for i, key in enumerate(keys)]


def timestamp(wall: float) -> Timestamp:
    """A protobuf Timestamp of a time.time() value."""
    value = Timestamp()
    value.FromNanoseconds(int(wall * 1e9))
    return value


class LocalDiscoveryServicer(pb_grpc.LocalDiscoveryServicer):
    """Advertise, withdraw and look up keys for this node's registry and pinner."""

    def __init__(self, engine: DiscoveryEngine, metrics: DiscoveryMetrics | None = None) -> None:
        self._engine = engine
        self._metrics = metrics

    @staticmethod
    async def _keys(keys: Sequence[str], context: Context) -> list[str]:
        try:
            return check_key_list(keys)
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def Advertise(
        self, request: pb.AdvertiseRequest, context: Context
    ) -> pb.AdvertiseResponse:
        keys = await self._keys(request.keys, context)
        added, total = self._engine.advertise(keys)
        return pb.AdvertiseResponse(added=added, total=total)

    async def Withdraw(self, request: pb.WithdrawRequest, context: Context) -> pb.WithdrawResponse:
        keys = await self._keys(request.keys, context)
        removed, total = self._engine.withdraw(keys)
        return pb.WithdrawResponse(removed=removed, total=total)

    async def ListAdvertised(
        self, request: pb.ListAdvertisedRequest, context: Context
    ) -> AsyncIterator[pb.ListAdvertisedResponse]:
        keys = self._engine.advertised()
        for start in range(0, len(keys), LIST_BATCH):
            yield pb.ListAdvertisedResponse(keys=keys[start : start + LIST_BATCH])

    async def FindProviders(
        self, request: pb.FindProvidersRequest, context: Context
    ) -> AsyncIterator[pb.FindProvidersResponse]:
        try:
            key = check_key(request.key, "key")
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        # The registry's request id comes as metadata; it is logged explicitly (this generator
        # may be finished from another context, so nothing is bound to contextvars here).
        request_id = from_metadata(context.invocation_metadata())
        started = time.monotonic()
        first: float | None = None
        found = 0
        try:
            async for provider in self._engine.find_providers(key, request.limit):
                if first is None:
                    first = time.monotonic() - started
                found += 1
                yield pb.FindProvidersResponse(provider=contact_to_proto(provider))
        finally:
            took = first if first is not None else time.monotonic() - started
            if self._metrics is not None:
                self._metrics.lookup_done(took, found > 0)
            fields = {"request_id": request_id} if request_id is not None else {}
            log.info(
                "lookup",
                key=key,
                providers=found,
                first_ms=round(took * 1000, 2),
                **fields,
            )

    async def ListPeers(
        self, request: pb.ListPeersRequest, context: Context
    ) -> pb.ListPeersResponse:
        # The core keeps monotonic times; shown as wall-clock times.
        offset = time.time() - time.monotonic()
        return pb.ListPeersResponse(
            peers=[
                pb.PeerState(
                    contact=contact_to_proto(entry.contact),
                    last_seen=timestamp(entry.last_seen + offset),
                )
                for entry in self._engine.node.table.peers()
            ]
        )

    async def Stats(self, request: pb.StatsRequest, context: Context) -> pb.StatsResponse:
        engine = self._engine
        counters = engine.counters
        return pb.StatsResponse(
            node_id=engine.node_id,
            discovery_port=engine.discovery_port,
            registry_port=engine.registry_port,
            started_at=timestamp(engine.started_at),
            peers=len(engine.node.table),
            advertised_keys=len(engine.node.advertised),
            provider_records=len(engine.node.store),
            lookups=counters.lookups,
            lookup_cache_hits=counters.lookup_cache_hits,
            lookups_empty=counters.lookups_empty,
        )
