"""The registry's Prometheus metrics and its /metrics route.

Request counts carry the labels Spegel's ``spegel_mirror_requests_total`` has (registry, cache,
source) plus the kind of content, so dashboards built for Spegel translate by renaming.
Byte counts and gauges are read from :class:`RegistryStats` at scrape time (no second
bookkeeping); the mirror path reports hedges, quarantines and latencies through
:class:`MirrorMetrics`.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sanic import HTTPResponse, Request

from services.common.metrics import PREFIX, new_registry, render
from services.common.status.report import RECENT_WINDOW_S
from services.registry.stats import RequestKind, Result

if TYPE_CHECKING:
    from services.registry.context import RegistryContext

# The `cache` label: Spegel's hit/miss, with a peer hit told apart from a local one.
CACHE_LABELS: dict[Result, str] = {
    Result.LOCAL_HIT: "hit",
    Result.PEER_HIT: "peer_hit",
    Result.NOT_FOUND: "miss",
    Result.REFUSED: "refused",
    Result.CLIENT_ERROR: "client_error",
    Result.ERROR: "error",
}
# Peer answers arrive within milliseconds on a LAN; the tail shows stalled peers.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def source_label(from_peer: bool) -> str:
    """Spegel's `source`: internal = another node's registry asked, external = a local client."""
    return "internal" if from_peer else "external"


class MirrorMetrics:
    """What the mirror path reports: peer latencies, resolve times, hedges, quarantines, resumes
    and slow peers."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.peer_fetch = Histogram(
            f"{PREFIX}_peer_fetch_duration_seconds",
            "Seconds from sending a request to a peer until its response headers arrived",
            ["kind", "result"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.resolve = Histogram(
            f"{PREFIX}_resolve_duration_seconds",
            "Seconds until discovery named the first provider of a key (or the lookup ended)",
            ["result"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.hedges = Counter(
            f"{PREFIX}_hedges",
            "Extra peer requests started because no earlier one had its headers in time",
            registry=registry,
        )
        self.quarantines = Counter(
            f"{PREFIX}_peer_quarantines",
            "Times a peer was quarantined for sending content that did not match its digest",
            registry=registry,
        )
        self.resumes = Counter(
            f"{PREFIX}_relay_resumes",
            "Relayed blob bodies continued from another peer by Range (their peer failed, "
            "stalled, ended early or was left for being slow)",
            registry=registry,
        )
        self.probes = Counter(
            f"{PREFIX}_rate_probes",
            "Small Range reads of another provider (bytes dropped) started to measure its rate, "
            "because no rate was known to judge a relay's peer by (a node's first pulls)",
            registry=registry,
        )
        self.rank_downs = Counter(
            f"{PREFIX}_peer_rank_downs",
            "Peers a relay left for being slow, by rule: floor (min_peer_rate), ratio "
            "(slow_peer_ratio of another provider), early (its early test), deadline "
            "(peer_attempt_timeout)",
            ["rule"],
            registry=registry,
        )

    def peer_fetched(self, kind: str, seconds: float, ok: bool) -> None:
        self.peer_fetch.labels(kind=kind, result="ok" if ok else "error").observe(seconds)

    def resolved(self, seconds: float, found: bool) -> None:
        self.resolve.labels(result="found" if found else "not_found").observe(seconds)

    def hedge_fired(self) -> None:
        self.hedges.inc()

    def peer_quarantined(self) -> None:
        self.quarantines.inc()

    def relay_resumed(self) -> None:
        self.resumes.inc()

    def rate_probed(self) -> None:
        self.probes.inc()

    def peer_ranked_down(self, rule: str) -> None:
        self.rank_downs.labels(rule=rule).inc()


class _LiveCollector(Collector):
    """Values read from the live registry state at scrape time."""

    def __init__(self, ctx: RegistryContext) -> None:
        self._ctx = ctx

    def collect(self) -> Iterator[Metric]:
        stats = self._ctx.stats
        served = CounterMetricFamily(
            f"{PREFIX}_served_bytes",
            "Body bytes sent to clients, by where they came from (local content or relayed "
            "from peers)",
            labels=["source"],
        )
        served.add_metric(["local"], stats.bytes_served_local)
        served.add_metric(["peer"], stats.bytes_relayed)
        yield served
        yield GaugeMetricFamily(
            f"{PREFIX}_mirror_requests_in_flight",
            "Requests being answered right now",
            value=max(0, stats.in_flight),
        )
        recent = GaugeMetricFamily(
            f"{PREFIX}_mirror_recent_requests",
            f"Manifest and blob requests of local clients in the last {RECENT_WINDOW_S:g} "
            "seconds, by cache result",
            labels=["cache"],
        )
        counts = stats.recent.counts()
        for result, label in CACHE_LABELS.items():
            recent.add_metric([label], counts[result])
        yield recent
        mirror = self._ctx.mirror
        yield GaugeMetricFamily(
            f"{PREFIX}_peers_quarantined",
            "Peers quarantined right now (kept out of every relay)",
            value=len(mirror.quarantine) if mirror is not None else 0,
        )


class RegistryMetrics:
    """All metrics of one registry app, in its own CollectorRegistry."""

    def __init__(self, ctx: RegistryContext) -> None:
        self.registry = new_registry("registry")
        self.requests = Counter(
            f"{PREFIX}_mirror_requests",
            "Manifest and blob requests answered, by registry, kind, cache result and source",
            ["registry", "kind", "cache", "source"],
            registry=self.registry,
        )
        self.mirror = MirrorMetrics(self.registry)
        self.registry.register(_LiveCollector(ctx))

    def request_done(
        self, registry: str, kind: RequestKind, result: Result, from_peer: bool
    ) -> None:
        """Count one finished manifest or blob request (the /v2/ base check is not counted)."""
        if kind is RequestKind.OTHER:
            return
        self.requests.labels(
            registry=registry,
            kind=kind.value,
            cache=CACHE_LABELS[result],
            source=source_label(from_peer),
        ).inc()

    def render(self) -> bytes:
        return render(self.registry)


AnyRequest = Request[Any, SimpleNamespace]


async def metrics_handler(request: AnyRequest) -> HTTPResponse:
    """GET /metrics: the Prometheus text exposition of this registry."""
    metrics: RegistryMetrics = request.app.ctx.metrics
    return HTTPResponse(metrics.render(), content_type=CONTENT_TYPE_LATEST)


def install(app: Any) -> None:
    """Add /metrics to a registry app."""
    app.add_route(metrics_handler, "/metrics", methods=["GET", "HEAD"], name="metrics")
