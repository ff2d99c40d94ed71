"""The upstream metrics as Prometheus exposes them: names, labels, and every series from zero."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from services.registry.upstream.metrics import KINDS, RESULTS, UpstreamMetrics


def test_names_and_labels_follow_the_registry_metrics() -> None:
    registry = CollectorRegistry()
    metrics = UpstreamMetrics(registry)
    metrics.received(1234)
    metrics.request("blob", "ok")
    metrics.in_flight.set(2)
    text = generate_latest(registry).decode()
    assert "peermirror_upstream_bytes_total 1234.0" in text
    assert 'peermirror_upstream_requests_total{kind="blob",result="ok"} 1.0' in text
    assert "peermirror_upstream_fetches_in_flight 2.0" in text
    for kind in KINDS:
        for result in RESULTS:
            assert f'peermirror_upstream_requests_total{{kind="{kind}",result="{result}"}}' in text
