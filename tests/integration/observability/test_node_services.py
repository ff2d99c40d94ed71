"""Real service processes on loopback, two nodes: A (registry, discovery, pinner over an OCI
layout holding one image) and B (registry and discovery, no pinner, empty store).

One pull through B's registry is found in every /metrics it should move, its request id is
followed from B's registry log to B's discovery log and A's registry log, and `peermirror
status` reports both nodes (B's pinner, never started, as DOWN).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from services.common.genproto.peermirror.discovery.v1 import local_pb2, local_pb2_grpc
from services.common.metrics import version
from tests.harness.images import BuiltImage, build_image
from tests.harness.metrics_scrape import Samples
from tests.harness.registry_inproc import write_registries_file
from tests.harness.service_procs import (
    ServiceProcess,
    cli_argv,
    free_port,
    http_get,
    running,
    wait_serving,
)
from tests.harness.wait import wait_for

IMAGE = "docker.io/library/app:1.0"
REPO = "library/app"
TRACE_ID = "trace-b-to-a-0001"
WAIT = 60.0


@dataclass
class Node:
    name: str
    config: Path
    ports: dict[str, int]
    procs: dict[str, ServiceProcess]

    def grpc(self, service: str) -> str:
        return f"127.0.0.1:{self.ports[service + '_grpc']}"

    def metrics(self, service: str) -> Samples:
        status, body = http_get(f"http://127.0.0.1:{self.ports[service + '_metrics']}/metrics")
        assert status == 200, body
        return Samples.parse(body.decode())

    @property
    def registry_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['registry_http']}"

    def log(self, service: str) -> list[dict[str, Any]]:
        lines = []
        for line in self.procs[service].output_lines():
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict):
                    lines.append(obj)
        return lines


def write_config(directory: Path, name: str, ports: dict[str, int], bootstrap: list[str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    data = {
        "node": {"name": name, "data_dir": str(directory / "data"), "address": "127.0.0.1"},
        "log": {"level": "info", "format": "json"},
        "tls": {"enabled": False},
        "registry": {
            "host": "127.0.0.1",
            "port": ports["registry_http"],
            "grpc_address": f"127.0.0.1:{ports['registry_grpc']}",
            "metrics_address": f"127.0.0.1:{ports['registry_metrics']}",
            "registries_file": str(write_registries_file(directory / "registries.yaml", ["*"])),
            # Wide budgets for a busy shared machine: this is about counts, not speed.
            "resolve_timeout": 2.0,
            "header_timeout": 2.0,
            "peer_timeout": 5.0,
        },
        "discovery": {
            "host": "127.0.0.1",
            "port": ports["discovery_peer"],
            "local_address": f"127.0.0.1:{ports['discovery_grpc']}",
            "metrics_address": f"127.0.0.1:{ports['discovery_metrics']}",
            "bootstrap_peers": bootstrap,
            "republish_interval": 1.0,
        },
        "pinner": {
            "grpc_address": f"127.0.0.1:{ports['pinner_grpc']}",
            "metrics_address": f"127.0.0.1:{ports['pinner_metrics']}",
            "images_dir": str(directory / "images"),
            "certs_dir": str(directory / "certs.d"),
        },
        "store": {"backend": "oci-layout", "oci_layout_path": str(directory / "layout")},
    }
    path = directory / "peermirror.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def pick_ports() -> dict[str, int]:
    names = ["registry_http", "discovery_peer"] + [
        f"{service}_{what}"
        for service in ("registry", "discovery", "pinner")
        for what in ("grpc", "metrics")
    ]
    return {name: free_port() for name in names}


def discovery_stats(node: Node) -> local_pb2.StatsResponse:
    with grpc.insecure_channel(node.grpc("discovery")) as channel:
        stub = local_pb2_grpc.LocalDiscoveryStub(channel)
        reply: local_pb2.StatsResponse = stub.Stats(local_pb2.StatsRequest(), timeout=2.0)
        return reply


def providers_of(node: Node, key: str) -> int:
    with grpc.insecure_channel(node.grpc("discovery")) as channel:
        stub = local_pb2_grpc.LocalDiscoveryStub(channel)
        request = local_pb2.FindProvidersRequest(key=key, limit=3)
        return sum(1 for _ in stub.FindProviders(request, timeout=2.0))


@dataclass
class Cluster:
    a: Node
    b: Node
    image: BuiltImage
    before: dict[str, Samples]
    received: int

    @property
    def blobs(self) -> int:
        return 1 + len(self.image.platforms[0].layers)


def _start(node: Node, service: str, logs: Path, stack: contextlib.ExitStack) -> None:
    proc = stack.enter_context(
        running(cli_argv(service, "--config", str(node.config)), logs, f"{node.name}-{service}")
    )
    node.procs[service] = proc


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("observability")
    logs = root / "logs"
    ports_a, ports_b = pick_ports(), pick_ports()
    config_a = write_config(root / "a", "node-a", ports_a, [])
    image = build_image(root / "a" / "layout", name=IMAGE, layers=2, layer_size=200 * 1024)
    config_b = write_config(
        root / "b", "node-b", ports_b, [f"127.0.0.1:{ports_a['discovery_peer']}"]
    )
    a = Node("node-a", config_a, ports_a, {})
    b = Node("node-b", config_b, ports_b, {})
    with contextlib.ExitStack() as stack:
        for service in ("discovery", "registry", "pinner"):
            _start(a, service, logs, stack)
        for service in ("discovery", "registry"):
            _start(b, service, logs, stack)
        for node in (a, b):
            for service, proc in node.procs.items():
                wait_serving(node.grpc(service), proc)
        keys = 1 + len(image.blobs)
        wait_for(
            "A advertising the image", lambda: discovery_stats(a).advertised_keys == keys, WAIT
        )
        wait_for("B finding A", lambda: providers_of(b, IMAGE) > 0, WAIT)
        wait_for(
            "B finding A's layer",
            lambda: providers_of(b, image.platforms[0].layers[-1].descriptor.digest) > 0,
            WAIT,
        )
        before = {
            "b_discovery": b.metrics("discovery"),
            "b_registry": b.metrics("registry"),
            "a_registry": a.metrics("registry"),
        }
        received = pull_through(b, image)
        yield Cluster(a, b, image, before, received)


def pull_through(node: Node, image: BuiltImage) -> int:
    """Tag, config and layers through `node`'s registry, all with one request id."""
    import urllib.request

    platform = image.platforms[0]
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    received = 0
    paths = [f"/v2/{REPO}/manifests/1.0"] + [
        f"/v2/{REPO}/blobs/{desc.digest}"
        for desc in (platform.config, *(layer.descriptor for layer in platform.layers))
    ]
    for path in paths:
        request = urllib.request.Request(
            f"{node.registry_url}{path}?ns=docker.io",
            headers={
                "X-Request-Id": TRACE_ID,
                "Accept": "application/vnd.oci.image.manifest.v1+json",
            },
        )
        with opener.open(request, timeout=20) as resp:
            assert resp.status == 200
            assert resp.headers["X-Request-Id"] == TRACE_ID
            received += len(resp.read())
    return received


def moved(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return after.value(name, **labels) - before.value(name, **labels)


def test_every_metrics_endpoint_after_one_pull(cluster: Cluster) -> None:
    a, b, blobs = cluster.a, cluster.b, cluster.blobs
    platform = cluster.image.platforms[0]
    assert cluster.received == platform.manifest.size + platform.config.size + sum(
        layer.descriptor.size for layer in platform.layers
    )
    b_registry = b.metrics("registry")
    before = cluster.before["b_registry"]
    requests = "peermirror_mirror_requests_total"
    out = {"registry": "docker.io", "source": "external"}
    assert moved(b_registry, before, requests, kind="manifest", cache="peer_hit", **out) == 1
    assert moved(b_registry, before, requests, kind="blob", cache="peer_hit", **out) == blobs
    assert moved(b_registry, before, requests) == 1 + blobs
    bytes_ = "peermirror_served_bytes_total"
    assert moved(b_registry, before, bytes_, source="peer") == cluster.received
    fetches = "peermirror_peer_fetch_duration_seconds_count"
    assert moved(b_registry, before, fetches, result="ok") == 1 + blobs
    resolves = "peermirror_resolve_duration_seconds_count"
    assert moved(b_registry, before, resolves, result="found") == 1 + blobs

    # The same figures on the registry's own HTTP port (what Prometheus scrapes in a cluster).
    status, body = http_get(f"{b.registry_url}/metrics")
    assert status == 200
    route = Samples.parse(body.decode())
    assert route.value(requests, cache="peer_hit") == b_registry.value(requests, cache="peer_hit")

    a_registry = a.metrics("registry")
    inside = {"registry": "docker.io", "source": "internal", "cache": "hit"}
    before = cluster.before["a_registry"]
    assert moved(a_registry, before, requests, kind="manifest", **inside) == 1
    assert moved(a_registry, before, requests, kind="blob", **inside) == blobs
    assert moved(a_registry, before, bytes_, source="local") == cluster.received

    b_discovery = b.metrics("discovery")
    before = cluster.before["b_discovery"]
    assert moved(b_discovery, before, "peermirror_lookups_total") == 1 + blobs
    lookups = "peermirror_lookup_duration_seconds_count"
    assert moved(b_discovery, before, lookups, result="found") == 1 + blobs
    assert b_discovery.value("peermirror_routing_table_peers") == 1
    assert b_discovery.value("peermirror_provided_keys") == 0

    a_discovery = a.metrics("discovery")
    assert a_discovery.value("peermirror_routing_table_peers") == 1
    assert a_discovery.value("peermirror_provided_keys", kind="digest") == len(cluster.image.blobs)
    assert a_discovery.value("peermirror_provided_keys", kind="tag") == 1

    a_pinner = a.metrics("pinner")
    keys = "peermirror_advertised_keys"
    docker = {"registry": "docker.io"}
    assert a_pinner.value(keys, kind="digest", **docker) == len(cluster.image.blobs)
    assert a_pinner.value(keys, kind="tag", **docker) == 1
    assert a_pinner.value("peermirror_advertised_images", **docker) == 1
    assert a_pinner.value("peermirror_imports_total") == 0

    for node, service in ((a, "registry"), (a, "discovery"), (a, "pinner"), (b, "discovery")):
        samples = node.metrics(service)
        assert samples.value("peermirror_build_info", service=service, version=version()) == 1
        assert samples.value("peermirror_start_time_seconds", service=service) > 0


def test_request_id_followed_from_b_to_a(cluster: Cluster) -> None:
    a, b = cluster.a, cluster.b
    manifest = f"/v2/{REPO}/manifests/1.0"

    def traced(lines: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
        return [
            line
            for line in lines
            if line.get("event") == event and line.get("request_id") == TRACE_ID
        ]

    # B: one INFO line per request (each a miss served by a peer).
    b_lines = traced(b.log("registry"), "request")
    assert len(b_lines) == 1 + cluster.blobs
    assert {line["result"] for line in b_lines} == {"peer_hit"}
    assert {line["level"] for line in b_lines} == {"info"}
    assert any(line["path"] == manifest for line in b_lines)
    # B's discovery: the lookups made for those requests, with the same id.
    lookups = traced(b.log("discovery"), "lookup")
    assert len(lookups) == 1 + cluster.blobs
    assert all(line["providers"] >= 1 for line in lookups)
    assert {line["key"] for line in lookups} >= {IMAGE}
    # A: the peer requests, answered from A's own content.
    a_lines = traced(a.log("registry"), "request")
    assert len(a_lines) == 1 + cluster.blobs
    assert {(line["source"], line["result"]) for line in a_lines} == {("internal", "local_hit")}
    assert {line["path"] for line in a_lines} == {line["path"] for line in b_lines}


def run_status(node: Node, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_argv("status", "--config", str(node.config), *extra),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


SERVICE_KEYS = {"state", "health", "address", "metrics_address", "version", "uptime_seconds"}


def check_schema(doc: dict[str, Any]) -> None:
    assert set(doc) == {
        "schema",
        "node",
        "ok",
        "services",
        "peers",
        "provider_records",
        "advertised_keys",
        "pinned_images",
        "leases",
        "mirror",
        "inflight",
    }
    assert doc["schema"] == 1
    assert set(doc["inflight"]) == {"fetches", "coalesced_waiters"}
    if doc["leases"] is not None:  # null when discovery did not answer
        assert set(doc["leases"]) == {"held", "records", "granted", "expired", "lost", "waits"}
    assert set(doc["services"]) == {"registry", "discovery", "pinner"}
    for service in doc["services"].values():
        assert set(service) == SERVICE_KEYS
        assert service["state"] in ("UP", "NOT_READY", "DOWN")
    assert set(doc["mirror"]) == {
        "requests",
        "hit_rate",
        "recent_requests",
        "recent_hit_rate",
        "recent_window_seconds",
    }


def test_status_json_all_up(cluster: Cluster) -> None:
    a = cluster.a
    result = run_status(a, "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    check_schema(doc)
    assert doc["node"] == "node-a"
    assert doc["ok"] is True
    for name, service in doc["services"].items():
        assert service["state"] == "UP"
        assert service["health"] == "SERVING"
        assert service["address"] == a.grpc(name)
        assert service["version"] == version()
        assert service["uptime_seconds"] >= 0
    assert doc["peers"] == 1
    assert doc["advertised_keys"] == 1 + len(cluster.image.blobs)
    # The OCI-layout pinner has no containerd, so nothing is pinned there.
    assert doc["pinned_images"] is None
    # No first pull went through a fetch lease here.
    assert doc["leases"] == dict.fromkeys(
        ("held", "records", "granted", "expired", "lost", "waits"), 0
    )
    # A's registry only answered B: none of its own clients asked anything.
    assert doc["mirror"]["requests"] == 0
    assert doc["mirror"]["hit_rate"] is None


def test_status_with_a_service_down(cluster: Cluster) -> None:
    b = cluster.b
    result = run_status(b, "--json")
    assert result.returncode == 1
    doc = json.loads(result.stdout)
    check_schema(doc)
    assert doc["ok"] is False
    pinner = doc["services"]["pinner"]
    assert pinner["state"] == "DOWN"
    assert pinner["health"].startswith("UNREACHABLE")
    assert pinner["version"] is None and pinner["uptime_seconds"] is None
    assert doc["services"]["registry"]["state"] == "UP"
    assert doc["services"]["discovery"]["state"] == "UP"
    assert doc["peers"] == 1
    assert doc["mirror"]["requests"] == 1 + cluster.blobs
    assert doc["mirror"]["hit_rate"] == 1.0
    assert doc["mirror"]["recent_requests"] == 1 + cluster.blobs
    assert doc["mirror"]["recent_hit_rate"] == 1.0

    text = run_status(b)
    assert text.returncode == 1
    rows = {line.split()[0]: line.split() for line in text.stdout.splitlines()}
    assert rows["pinner"][1] == "DOWN"
    assert rows["registry"][1] == "UP"
    assert "100.0%" in text.stdout
