"""Prometheus counters of upstream traffic, named like the registry's (`peermirror_upstream_*`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from services.common.metrics import PREFIX

# `kind` of a request: what was asked of the upstream.
KINDS = ("manifest", "blob", "token")
# `result`: how it ended, as the caller sees it (errors.py).
RESULTS = ("ok", "not_found", "auth", "unavailable", "busy")


class UpstreamMetrics:
    """Bytes received from upstream registries, requests by kind and result, fetches in flight."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.bytes = Counter(
            f"{PREFIX}_upstream_bytes",
            "Body bytes received from upstream registries (manifests and blobs)",
            registry=registry,
        )
        self.requests = Counter(
            f"{PREFIX}_upstream_requests",
            "Fetches from upstream registries by kind and result (one per fetch, whatever the "
            "number of endpoints, redirects and token requests it took)",
            ["kind", "result"],
            registry=registry,
        )
        self.in_flight = Gauge(
            f"{PREFIX}_upstream_fetches_in_flight",
            "Upstream fetches holding one of this node's upstream slots",
            registry=registry,
        )
        # Every label combination exists from the start, so rates work from the first scrape.
        for kind in KINDS:
            for result in RESULTS:
                self.requests.labels(kind=kind, result=result)

    def request(self, kind: str, result: str) -> None:
        self.requests.labels(kind=kind, result=result).inc()

    def received(self, n: int) -> None:
        self.bytes.inc(n)
