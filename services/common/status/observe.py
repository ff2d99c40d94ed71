"""What this node's services answer over their node-local addresses: gRPC health, introspection
or status RPCs, and /metrics; gathered into :class:`~services.common.status.report.Observed` for
`peermirror status` and the registry's status page."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, TypeVar

from services.common.config import NodeConfig
from services.common.grpc_channel import NO_PROXY
from services.common.status.report import SERVICES, Observed, ServiceObservation

if TYPE_CHECKING:
    import grpc
    from google.protobuf.timestamp_pb2 import Timestamp

    from services.common.genproto.peermirror.discovery.v1.local_pb2 import (
        StatsResponse as DiscoveryStats,
    )
    from services.common.genproto.peermirror.pinner.v1.pinner_pb2 import (
        StatusResponse as PinnerStatus,
    )
    from services.common.genproto.peermirror.registry.v1.introspection_pb2 import (
        StatsResponse as RegistryStats,
    )

T = TypeVar("T")

DEFAULT_TIMEOUT = 2.0
_WILDCARD_HOSTS = ("", "0.0.0.0", "[::]")


def dial_address(listen: str) -> str:
    """Where a local client connects for a listen address (wildcard hosts mean loopback)."""
    if listen.startswith("unix:"):
        return listen
    host, _, port = listen.rpartition(":")
    return f"127.0.0.1:{port}" if host in _WILDCARD_HOSTS else listen


def check(address: str, service: str = "", timeout: float = DEFAULT_TIMEOUT) -> str:
    """The health status name `address` reports for `service`, or `UNREACHABLE: <why>`."""
    # Imported here: only this subcommand pays for grpc at start.
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(dial_address(address)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            name = code.name if code is not None else "ERROR"
            return f"UNREACHABLE: {name}"
    status: str = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return status


def grpc_addresses(cfg: NodeConfig) -> dict[str, str]:
    """Node-local gRPC address of each service."""
    return {
        "registry": cfg.registry.grpc_address,
        "discovery": cfg.discovery.local_address,
        "pinner": cfg.pinner.grpc_address,
    }


def metrics_addresses(cfg: NodeConfig) -> dict[str, str | None]:
    """Node-local /metrics listener of each service (None when turned off)."""
    return {
        "registry": cfg.registry.metrics_address or None,
        "discovery": cfg.discovery.metrics_address or None,
        "pinner": cfg.pinner.metrics_address or None,
    }


def scrape(address: str, timeout: float) -> dict[str, list[tuple[dict[str, str], float]]] | None:
    """The samples of `http://<address>/metrics` by name (None when it does not answer)."""
    import urllib.error
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{dial_address(address)}/metrics", timeout=timeout) as resp:
            text = resp.read().decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError, ValueError):
        return None
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


def _first(samples: Mapping[str, list[tuple[dict[str, str], float]]], name: str) -> float | None:
    values = samples.get(name)
    return values[0][1] if values else None


def _channel(address: str) -> grpc.Channel:
    import grpc

    return grpc.insecure_channel(dial_address(address), options=NO_PROXY)


def _ask(address: str, call: Callable[[grpc.Channel], T]) -> T | None:
    """``call(channel)`` on a channel to `address`; None when the service does not answer it."""
    import grpc

    try:
        with _channel(address) as ch:
            return call(ch)
    except grpc.RpcError:
        return None


def _started(obs: Observed, name: str, started_at: Timestamp) -> None:
    """The start time a service's RPC reports, unless its /metrics gave one already."""
    seen = obs.services[name]
    if seen.started_at is None:
        seen.started_at = started_at.ToNanoseconds() / 1e9


def _observe_service(
    address: str, metrics_address: str | None, timeout: float
) -> tuple[ServiceObservation, dict[str, list[tuple[dict[str, str], float]]] | None]:
    seen = ServiceObservation(
        address=address, health=check(address, timeout=timeout), metrics_address=metrics_address
    )
    samples = scrape(metrics_address, timeout) if metrics_address is not None else None
    if samples is not None:
        info = samples.get("peermirror_build_info")
        if info:
            seen.version = info[0][0].get("version")
        seen.started_at = _first(samples, "peermirror_start_time_seconds")
    return seen, samples


def _ask_services(
    grpc_at: Mapping[str, str], timeout: float
) -> tuple[RegistryStats | None, DiscoveryStats | None, PinnerStatus | None]:
    """What the registry's and discovery's Stats and the pinner's Status RPCs answer (None
    for a service that does not)."""
    from services.common.genproto.peermirror.discovery.v1 import local_pb2, local_pb2_grpc
    from services.common.genproto.peermirror.pinner.v1 import pinner_pb2, pinner_pb2_grpc
    from services.common.genproto.peermirror.registry.v1 import (
        introspection_pb2,
        introspection_pb2_grpc,
    )

    return (
        _ask(
            grpc_at["registry"],
            lambda ch: introspection_pb2_grpc.RegistryIntrospectionStub(ch).Stats(
                introspection_pb2.StatsRequest(), timeout=timeout
            ),
        ),
        _ask(
            grpc_at["discovery"],
            lambda ch: local_pb2_grpc.LocalDiscoveryStub(ch).Stats(
                local_pb2.StatsRequest(), timeout=timeout
            ),
        ),
        # UNIMPLEMENTED on a pinner without containerd (oci-layout store): nothing pinned there.
        _ask(
            grpc_at["pinner"],
            lambda ch: pinner_pb2_grpc.PinnerStub(ch).Status(
                pinner_pb2.StatusRequest(), timeout=timeout
            ),
        ),
    )


def _registry(obs: Observed, stats: RegistryStats) -> None:
    from services.common.genproto.peermirror.registry.v1 import introspection_pb2 as pb

    # The cache labels of the registry's metrics, for the results the hit rate counts.
    labels = {
        pb.REQUEST_RESULT_LOCAL_HIT: "hit",
        pb.REQUEST_RESULT_PEER_HIT: "peer_hit",
        pb.REQUEST_RESULT_NOT_FOUND: "miss",
        pb.REQUEST_RESULT_ERROR: "error",
    }
    counted_kinds = {pb.REQUEST_KIND_MANIFEST, pb.REQUEST_KIND_BLOB}
    counts: dict[str, int] = {}
    for entry in stats.requests:
        if entry.from_peer or entry.kind not in counted_kinds or entry.result not in labels:
            continue
        label = labels[entry.result]
        counts[label] = counts.get(label, 0) + entry.count
    obs.since_start = counts
    _started(obs, "registry", stats.started_at)


def _discovery(obs: Observed, stats: DiscoveryStats) -> None:
    obs.peers = stats.peers
    obs.provider_records = stats.provider_records
    obs.advertised_keys = stats.advertised_keys
    obs.leases = {
        "held": stats.leases_held,
        "records": stats.lease_records,
        "granted": stats.leases_granted,
        "expired": stats.leases_expired,
        "lost": stats.leases_lost,
        "waits": stats.lease_waits,
    }
    _started(obs, "discovery", stats.started_at)


def _pinner(obs: Observed, status: PinnerStatus) -> None:
    obs.pinned_images = status.pinned_images
    if obs.advertised_keys is None:
        obs.advertised_keys = status.advertised_keys


def inflight_from_metrics(
    obs: Observed, samples: Mapping[str, list[tuple[dict[str, str], float]]]
) -> None:
    """Shared first pulls, when the registry runs them (its metrics have the gauge)."""
    fetches = _first(samples, "peermirror_inflight_fetches")
    if fetches is None:
        return
    obs.inflight_fetches = int(fetches)
    waiters = samples.get("peermirror_inflight_coalesced_waiters_total", [])
    obs.coalesced_waiters = int(sum(value for _, value in waiters))


def observe(cfg: NodeConfig, timeout: float = DEFAULT_TIMEOUT) -> Observed:
    """Ask every service of the node `cfg` describes."""
    grpc_at = grpc_addresses(cfg)
    metrics_at = metrics_addresses(cfg)
    services: dict[str, ServiceObservation] = {}
    registry_samples = None
    for name in SERVICES:
        services[name], samples = _observe_service(grpc_at[name], metrics_at[name], timeout)
        if name == "registry":
            registry_samples = samples
    obs = Observed(node=cfg.node.name, now=time.time(), services=services)
    if registry_samples is not None:
        obs.recent = {
            labels.get("cache", ""): int(value)
            for labels, value in registry_samples.get("peermirror_mirror_recent_requests", [])
        }
        inflight_from_metrics(obs, registry_samples)
    registry, discovery, pinner = _ask_services(grpc_at, timeout)
    if registry is not None:
        _registry(obs, registry)
    if discovery is not None:
        _discovery(obs, discovery)
    if pinner is not None:
        _pinner(obs, pinner)
    return obs
