"""The LocalDiscovery gRPC service (node-local address only): a thin adapter over the engine.

Refusals are raised as errors of services.common.errors; the server's interceptor answers them.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from services.common.config import DiscoverySection
from services.common.errors import InvalidArgumentError, UnimplementedError
from services.common.genproto.peermirror.discovery.v1 import local_pb2 as pb
from services.common.genproto.peermirror.discovery.v1 import local_pb2_grpc as pb_grpc
from services.common.grpc_server import client_of
from services.common.logsetup import get_logger
from services.common.ratelog import LimitLog
from services.common.request_id import from_metadata
from services.discovery.engine import DiscoveryEngine
from services.discovery.lease_broker import LeaseBroker
from services.discovery.metrics import DiscoveryMetrics
from services.discovery.wire import contact_to_proto, duration

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["LocalDiscovery"].full_name

# Keys per ListAdvertised message.
LIST_BATCH = 1000

Context = grpc.aio.ServicerContext[object, object]

log = get_logger(__name__)

T = TypeVar("T")


class KeyLimitExceeded(InvalidArgumentError):
    """A request over one of the configured key bounds; `limit` names its config key."""

    def __init__(self, field: str, problem: str, limit: str, maximum: int) -> None:
        super().__init__(problem, field=field)
        self.limit = limit
        self.maximum = maximum


@dataclass(frozen=True)
class KeyLimits:
    """The bounds on keys the node-local API accepts (discovery.max_keys_per_advertise and
    discovery.max_key_length)."""

    max_keys: int
    max_key_length: int

    @classmethod
    def of(cls, section: DiscoverySection) -> KeyLimits:
        return cls(section.max_keys_per_advertise, section.max_key_length)

    def check_key(self, key: str, field: str) -> str:
        """A key string: a digest or reference, non-empty, printable, bounded."""
        if not key:
            raise InvalidArgumentError("must not be empty", field=field)
        if len(key) > self.max_key_length:
            raise KeyLimitExceeded(
                field,
                f"longer than {self.max_key_length} characters",
                "max_key_length",
                self.max_key_length,
            )
        if not key.isprintable() or any(ch.isspace() for ch in key):
            raise InvalidArgumentError(
                "must not contain whitespace or control characters", field=field
            )
        return key

    def check_key_list(self, keys: Sequence[str]) -> list[str]:
        """The keys of an Advertise/Withdraw call."""
        if len(keys) > self.max_keys:
            raise KeyLimitExceeded(
                "keys",
                f"at most {self.max_keys} keys per call, got {len(keys)}",
                "max_keys_per_advertise",
                self.max_keys,
            )
        return [self.check_key(key, f"keys[{i}]") for i, key in enumerate(keys)]


def timestamp(wall: float) -> Timestamp:
    """A protobuf Timestamp of a time.time() value."""
    value = Timestamp()
    value.FromNanoseconds(int(wall * 1e9))
    return value


@dataclass(eq=False)
class LocalDiscoveryServicer(pb_grpc.LocalDiscoveryServicer):
    """Advertise, withdraw and look up keys for this node's registry and pinner."""

    engine: DiscoveryEngine
    metrics: DiscoveryMetrics | None = None
    _: KW_ONLY
    limits: KeyLimits = field(default_factory=lambda: KeyLimits.of(DiscoverySection()))
    limit_log: LimitLog = field(default_factory=lambda: LimitLog(__name__))
    leases: LeaseBroker | None = None

    def _checked(self, check: Callable[[], T], context: Context) -> T:
        """``check()``; a key limit it hits is also logged (rate limited) before the refusal."""
        try:
            return check()
        except KeyLimitExceeded as exc:
            self.limit_log.refused(
                exc.limit,
                client_of(context.peer()),
                "client refused: request over a key limit",
                max=exc.maximum,
                field=exc.field,
            )
            raise

    def _keys(self, keys: Sequence[str], context: Context) -> list[str]:
        return self._checked(lambda: self.limits.check_key_list(keys), context)

    async def Advertise(
        self, request: pb.AdvertiseRequest, context: Context
    ) -> pb.AdvertiseResponse:
        keys = self._keys(request.keys, context)
        added, total = self.engine.advertise(keys)
        return pb.AdvertiseResponse(added=added, total=total)

    async def Withdraw(self, request: pb.WithdrawRequest, context: Context) -> pb.WithdrawResponse:
        keys = self._keys(request.keys, context)
        removed, total = self.engine.withdraw(keys)
        return pb.WithdrawResponse(removed=removed, total=total)

    async def ListAdvertised(
        self, request: pb.ListAdvertisedRequest, context: Context
    ) -> AsyncIterator[pb.ListAdvertisedResponse]:
        keys = self.engine.advertised()
        for start in range(0, len(keys), LIST_BATCH):
            yield pb.ListAdvertisedResponse(keys=keys[start : start + LIST_BATCH])

    async def FindProviders(
        self, request: pb.FindProvidersRequest, context: Context
    ) -> AsyncIterator[pb.FindProvidersResponse]:
        key = self._checked(lambda: self.limits.check_key(request.key, "key"), context)
        # The registry's request id comes as metadata; it is logged explicitly (this generator
        # may be finished from another context, so nothing is bound to contextvars here).
        request_id = from_metadata(context.invocation_metadata())
        started = time.monotonic()
        first: float | None = None
        found = 0
        fetching = self.leases.in_flight(key) if self.leases is not None else None
        try:
            limit = request.limit
            if fetching is not None:
                first = time.monotonic() - started
                found += 1
                yield pb.FindProvidersResponse(provider=contact_to_proto(fetching), in_flight=True)
                # The holder takes one place of the caller's limit (0 is the server's default).
                if limit == 1:
                    return
                limit = max(limit - 1, 0)
            async for provider in self.engine.find_providers(key, limit):
                if fetching is not None and provider.node_id == fetching.node_id:
                    continue
                if first is None:
                    first = time.monotonic() - started
                found += 1
                yield pb.FindProvidersResponse(provider=contact_to_proto(provider))
        finally:
            took = first if first is not None else time.monotonic() - started
            if self.metrics is not None:
                self.metrics.lookup_done(took, found > 0)
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
                for entry in self.engine.node.table.peers()
            ]
        )

    async def Stats(self, request: pb.StatsRequest, context: Context) -> pb.StatsResponse:
        engine = self.engine
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
            **self._lease_stats(),
        )

    # -- fetch leases (the logic is in lease_broker) -------------------------------------

    def _lease_stats(self) -> dict[str, int]:
        leases = self.leases
        if leases is None:
            return {}
        table = leases.table
        table.expire(self.engine.clock())
        return {
            "leases_held": leases.held(),
            "lease_records": len(table),
            "leases_granted": table.counters.granted,
            "leases_expired": table.counters.expired,
            "leases_lost": leases.counters.lost,
            "lease_waits": leases.counters.waits,
        }

    def _lease_request(
        self, key: str, ttl_seconds: int | None, context: Context
    ) -> tuple[LeaseBroker, str]:
        """The broker and the checked key; INVALID_ARGUMENT naming the field otherwise."""
        leases = self.leases
        if leases is None:
            raise UnimplementedError("fetch leases are not enabled")

        def check() -> str:
            checked = self.limits.check_key(key, "key")
            longest = leases.table.max_ttl
            if ttl_seconds is not None and ttl_seconds > longest:
                raise KeyLimitExceeded(
                    "ttl_seconds",
                    f"at most {longest:g} (discovery.max_lease_ttl), got {ttl_seconds}",
                    "max_lease_ttl",
                    int(longest),
                )
            return checked

        return leases, self._checked(check, context)

    async def AcquireLease(
        self, request: pb.AcquireLeaseRequest, context: Context
    ) -> pb.AcquireLeaseResponse:
        leases, key = self._lease_request(request.key, request.ttl_seconds, context)
        view = await leases.acquire(key, float(request.ttl_seconds), request.max_waiters)
        reply = pb.AcquireLeaseResponse(
            granted=view.granted, ttl=duration(view.ttl), waiters=view.waiters
        )
        if view.holder is not None:
            reply.holder.CopyFrom(contact_to_proto(view.holder))
        log.info(
            "lease",
            key=key,
            granted=view.granted,
            holder=str(view.holder) if view.holder is not None else "this node",
        )
        return reply

    async def RenewLease(
        self, request: pb.RenewLeaseRequest, context: Context
    ) -> pb.RenewLeaseResponse:
        leases, key = self._lease_request(request.key, request.ttl_seconds, context)
        view = await leases.renew(key, float(request.ttl_seconds))
        return pb.RenewLeaseResponse(ttl=duration(view.ttl), waiters=view.waiters)

    async def ReleaseLease(
        self, request: pb.ReleaseLeaseRequest, context: Context
    ) -> pb.ReleaseLeaseResponse:
        leases, key = self._lease_request(request.key, None, context)
        released = await leases.release(key)
        return pb.ReleaseLeaseResponse(released=released)

    async def GetLease(self, request: pb.GetLeaseRequest, context: Context) -> pb.GetLeaseResponse:
        leases, key = self._lease_request(request.key, None, context)
        view = await leases.get(key)
        if view is None:
            return pb.GetLeaseResponse(held=False)
        reply = pb.GetLeaseResponse(
            held=True, mine=view.granted, ttl=duration(view.ttl), waiters=view.waiters
        )
        if view.holder is not None:
            reply.holder.CopyFrom(contact_to_proto(view.holder))
        return reply
