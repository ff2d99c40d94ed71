"""Discovery's Prometheus metrics: routing table, provider records, keys and lookups.

Counts and sizes are read from the engine at scrape time (its counters are the one
bookkeeping); only lookup latency, which the engine does not keep, is observed here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.common.metrics import PREFIX, key_labels, new_registry, render
from services.discovery.engine import DiscoveryEngine
from services.discovery.lease_broker import LeaseBroker

# A lookup answered from the cache or from records held here takes microseconds; one that walks
# the DHT takes a few round trips.
LOOKUP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

# (metric name without prefix, help, engine counter attribute)
_COUNTERS = (
    ("lookups", "Provider lookups asked for on the node-local API", "lookups"),
    (
        "lookup_cache_hits",
        "Lookups answered from the lookup cache or joined to one already running",
        "lookup_cache_hits",
    ),
    ("lookups_empty", "Lookups that found no provider", "lookups_empty"),
    ("network_lookups", "Lookups that walked the DHT", "network_lookups"),
    ("keys_published", "Key records stored on other nodes", "keys_published"),
    ("keys_withdrawn", "Key records removed from other nodes", "keys_withdrawn"),
    ("peers_dropped", "Peers dropped from the routing table as dead", "nodes_dropped"),
    ("bootstrap_attempts", "Attempts to join the network", "bootstrap_attempts"),
)


@dataclass(eq=False)
class _EngineCollector(Collector):
    engine: DiscoveryEngine

    def collect(self) -> Iterator[Metric]:
        engine = self.engine
        counters = engine.counters
        for name, doc, attribute in _COUNTERS:
            family = CounterMetricFamily(f"{PREFIX}_{name}", doc)
            family.add_metric([], getattr(counters, attribute))
            yield family
        yield GaugeMetricFamily(
            f"{PREFIX}_routing_table_peers",
            "Peers in the routing table",
            value=len(engine.node.table),
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_provider_records",
            "Provider records this node holds for other nodes' keys",
            value=len(engine.node.store),
        )
        kinds: Counter[str] = Counter(key_labels(key)[1] for key in engine.advertised())
        provided = GaugeMetricFamily(
            f"{PREFIX}_provided_keys",
            "Keys this node provides in the DHT, by kind (digest or tag)",
            labels=["kind"],
        )
        for kind in ("digest", "tag"):
            provided.add_metric([kind], kinds[kind])
        yield provided


@dataclass(eq=False)
class _LeaseCollector(Collector):
    """Fetch leases: this node as the deciding node (its table) and as asker and holder."""

    leases: LeaseBroker
    engine: DiscoveryEngine

    def collect(self) -> Iterator[Metric]:
        leases = self.leases
        table = leases.table
        table.expire(self.engine.clock())
        for name, doc, value in (
            (
                "leases_granted",
                "Fetch leases this node granted as the node closest to the key",
                table.counters.granted,
            ),
            (
                "leases_expired",
                "Fetch leases kept here that expired unrenewed (holder died or stalled)",
                table.counters.expired,
            ),
            (
                "leases_lost",
                "Fetch leases this node held and lost to another node",
                leases.counters.lost,
            ),
            (
                "lease_waiters",
                "Lease requests of this node answered that another node fetches "
                "the content (coalesced into that node's download)",
                leases.counters.waits,
            ),
            (
                "lease_failovers",
                "Lease requests that went to the next-closest node because the "
                "closest did not answer",
                leases.counters.failovers,
            ),
        ):
            family = CounterMetricFamily(f"{PREFIX}_{name}", doc)
            family.add_metric([], value)
            yield family
        yield GaugeMetricFamily(
            f"{PREFIX}_leases_held", "Fetch leases this node holds", value=leases.held()
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_lease_records",
            "Fetch leases this node keeps as the node closest to their keys",
            value=len(table),
        )


class DiscoveryMetrics:
    """The metrics of one discovery service, in its own CollectorRegistry."""

    def __init__(self, engine: DiscoveryEngine, leases: LeaseBroker | None = None) -> None:
        self.registry = new_registry("discovery")
        self.lookup_duration = Histogram(
            f"{PREFIX}_lookup_duration_seconds",
            "Seconds a node-local lookup took to name its first provider (or to end without one)",
            ["result"],
            buckets=LOOKUP_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(engine))
        if leases is not None:
            self.registry.register(_LeaseCollector(leases, engine))

    def lookup_done(self, seconds: float, found: bool) -> None:
        self.lookup_duration.labels(result="found" if found else "not_found").observe(seconds)

    def render(self) -> bytes:
        return render(self.registry)
