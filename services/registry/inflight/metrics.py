"""Prometheus view of shared first pulls, read from the coordinator at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.common.metrics import PREFIX
from services.registry.inflight.coordinator import Coordinator


class InflightCollector(Collector):
    """In-flight fetches, spool bytes, coalesced waiters and fallbacks of one coordinator."""

    def __init__(self, coordinator: Coordinator) -> None:
        self._coordinator = coordinator

    def collect(self) -> Iterator[Metric]:
        c = self._coordinator
        counters = c.counters
        yield GaugeMetricFamily(
            f"{PREFIX}_inflight_fetches",
            "Upstream blob fetches this node runs for the cluster right now",
            value=len(c.fetches),
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_inflight_spool_bytes",
            "Bytes the spools of in-flight and recently fetched blobs reserve on disk",
            value=c.pool.used_bytes,
        )
        written = GaugeMetricFamily(
            f"{PREFIX}_inflight_spool_written_bytes",
            "Bytes written so far to the spools of in-flight fetches",
            value=sum(f.spool.state.written for f in c.fetches.values()),
        )
        yield written
        fetches = CounterMetricFamily(
            f"{PREFIX}_inflight_upstream_fetches",
            "Upstream blob fetches started for the cluster, by outcome",
            labels=["outcome"],
        )
        running = counters.fetches_started - counters.fetches_completed - counters.fetches_failed
        fetches.add_metric(["completed"], counters.fetches_completed)
        fetches.add_metric(["failed"], counters.fetches_failed)
        fetches.add_metric(["running"], max(0, running))
        yield fetches
        coalesced = CounterMetricFamily(
            f"{PREFIX}_inflight_coalesced_waiters",
            "Requests that waited on a fetch someone else started instead of fetching: local "
            "clients joining this node's fetch, peers reading its spool, and local clients "
            "sent to the node holding the lease",
            labels=["waiter"],
        )
        for waiter, count in sorted(counters.coalesced.items()):
            coalesced.add_metric([waiter], count)
        yield coalesced
        yield CounterMetricFamily(
            f"{PREFIX}_inflight_fallbacks",
            "Misses nobody fetched for the cluster (no lease, spool full, back-to-source "
            "limit, upstream refused): answered 404 so containerd pulls itself",
            value=counters.fallbacks,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_inflight_upstream_manifest_requests",
            "Manifest requests this node sent upstream for the cluster",
            value=counters.upstream_manifest_requests,
        )
