"""deploy/grafana/peermirror-dashboard.json against the metrics the services really register:
every query names only series the registry, discovery and pinner expose, and the figures the
dashboard is for (hit rate, bytes, latencies, DHT, content) each have a panel."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from prometheus_client import CollectorRegistry

from services.discovery.engine import DiscoveryEngine
from services.discovery.kademlia.node import DhtConfig
from services.discovery.metrics import DiscoveryMetrics
from services.pinner.metrics import PinnerMetrics
from services.registry.context import RegistryContext
from services.registry.metrics import RegistryMetrics
from services.registry.stats import RegistryStats

DASHBOARD = Path(__file__).resolve().parents[3] / "deploy" / "grafana" / "peermirror-dashboard.json"
METRIC = re.compile(r"\bpeermirror_[a-z0-9_]+")
# Series names a family of each type exposes, by suffix.
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("_sum", "_count", ""),
    "gauge": ("",),
    "info": ("_info",),
}


@dataclass
class PinnerRuntimeStandIn:
    """A pinner runtime with nothing tracked and no air-gap manager (families still exist)."""

    tracker: None = None
    airgap: None = None
    pins: None = None


def series_names(registry: CollectorRegistry) -> set[str]:
    names: set[str] = set()
    for family in registry.collect():
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def registered_series() -> set[str]:
    ctx = cast(RegistryContext, SimpleNamespace(stats=RegistryStats(), mirror=None))
    engine = DiscoveryEngine(bytes(32), DhtConfig(), discovery_port=5001, registry_port=5000)
    registries = [
        RegistryMetrics(ctx).registry,
        DiscoveryMetrics(engine).registry,
        PinnerMetrics(PinnerRuntimeStandIn()).registry,
    ]
    names: set[str] = set()
    for registry in registries:
        names |= series_names(registry)
    return names


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for panel in dash["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def exprs(dash: dict[str, Any]) -> dict[str, list[str]]:
    """Panel title -> its queries."""
    return {
        p["title"]: [t["expr"] for t in p.get("targets", [])]
        for p in panels(dash)
        if "targets" in p
    }


def test_every_query_names_only_registered_series() -> None:
    known = registered_series()
    # The collection itself must see the families the dashboard is about.
    assert {"peermirror_mirror_requests_total", "peermirror_routing_table_peers"} <= known
    unknown = {
        (title, name)
        for title, queries in exprs(dashboard()).items()
        for query in queries
        for name in METRIC.findall(query)
        if name not in known
    }
    assert unknown == set()


def test_every_panel_queries_peermirror_metrics() -> None:
    for title, queries in exprs(dashboard()).items():
        assert queries, title
        for query in queries:
            assert METRIC.search(query), (title, query)
            assert query.count("(") == query.count(")"), (title, query)
            assert query.count("{") == query.count("}"), (title, query)


def test_the_figures_operators_need_each_have_a_panel() -> None:
    used = {name for qs in exprs(dashboard()).values() for q in qs for name in METRIC.findall(q)}
    assert {
        "peermirror_mirror_requests_total",
        "peermirror_served_bytes_total",
        "peermirror_peer_fetch_duration_seconds_bucket",
        "peermirror_resolve_duration_seconds_bucket",
        "peermirror_hedges_total",
        "peermirror_peer_quarantines_total",
        "peermirror_relay_resumes_total",
        "peermirror_peer_rank_downs_total",
        "peermirror_rate_probes_total",
        "peermirror_routing_table_peers",
        "peermirror_provider_records",
        "peermirror_advertised_keys",
        "peermirror_pinned_images",
        "peermirror_imports_total",
    } <= used


def test_dashboard_is_importable_shape() -> None:
    dash = dashboard()
    assert dash["uid"] and dash["title"]
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "instance"} <= variables
    for panel in panels(dash):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert 'instance=~"$instance"' in target["expr"], panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
