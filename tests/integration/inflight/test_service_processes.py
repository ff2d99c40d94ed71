"""Shared first pulls in the real services: a discovery process and a registry process (as
`peermirror discovery` and `peermirror registry` run them) in front of a docker-registry
upstream on loopback. Concurrent local pulls of a layer and of a tag no node holds cost one
upstream request each; the status page and metrics show the fetch."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.harness.images import BuiltImage, build_image
from tests.harness.service_procs import (
    NodePorts,
    cli_argv,
    running,
    wait_http_ok,
    wait_serving,
    write_node_config,
)
from tests.harness.upstream import DistributionRegistry, loopback_registry, push_image

REGISTRY = "registry.test:5000"
REPO = "team/app"
TIMEOUT = aiohttp.ClientTimeout(total=60)
CLIENTS = 4


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    out = tmp_path_factory.mktemp("image")
    return build_image(
        out / "layout", name=f"{REGISTRY}/{REPO}:1.0", layers=2, layer_size=3_000_000
    )


@pytest.fixture
def upstream(tmp_path: Path, image: BuiltImage) -> Iterator[DistributionRegistry]:
    with loopback_registry(tmp_path / "upstream") as reg:
        push_image(image, reg)
        yield reg


@contextlib.contextmanager
def _node(
    tmp_path: Path, upstream: DistributionRegistry, inflight: dict[str, Any]
) -> Iterator[NodePorts]:
    """A discovery and a registry process of one node, its `inflight` config section as given,
    mirroring REGISTRY from `upstream` alone (the default endpoint is never dialed); their logs
    under tmp_path/logs."""
    ports = NodePorts.pick()
    config = write_node_config(tmp_path / "node", ports)
    registries = tmp_path / "node" / "registries.yaml"
    registries.write_text(
        yaml.safe_dump({"mirrors": {REGISTRY: {"endpoint": [upstream.url]}}}), encoding="utf-8"
    )
    data = yaml.safe_load(config.read_text(encoding="utf-8"))
    data["registry"]["registries_file"] = str(registries)
    data["pinner"]["disable_default_endpoint"] = True
    data["inflight"] = inflight
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    logs = tmp_path / "logs"
    with (
        running(cli_argv("discovery", "--config", str(config)), logs, "discovery") as discovery,
        running(cli_argv("registry", "--config", str(config)), logs, "registry") as registry,
    ):
        wait_serving(ports.grpc_address("discovery"), discovery)
        wait_serving(ports.grpc_address("registry"), registry)
        wait_http_ok(f"{ports.registry_url}/readyz")
        yield ports


@pytest.fixture
def node(tmp_path: Path, upstream: DistributionRegistry) -> Iterator[NodePorts]:
    with _node(tmp_path, upstream, {"manifest_window": 2.0}) as ports:
        yield ports


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes, str]:
    async with session.get(url) as response:
        return (
            response.status,
            await response.read(),
            response.headers.get("Docker-Content-Digest", ""),
        )


async def test_concurrent_first_pulls_cost_one_upstream_request(
    node: NodePorts, upstream: DistributionRegistry, image: BuiltImage
) -> None:
    layer = image.platforms[0].layers[-1].descriptor.digest
    data = image.blob_paths[layer].read_bytes()
    base = f"{node.registry_url}/v2/{REPO}"
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        blobs = await asyncio.gather(
            *(_get(session, f"{base}/blobs/{layer}?ns={REGISTRY}") for _ in range(CLIENTS))
        )
        tags = await asyncio.gather(
            *(_get(session, f"{base}/manifests/1.0?ns={REGISTRY}") for _ in range(CLIENTS))
        )
        async with session.get(f"{node.registry_url}/metrics") as response:
            metrics = await response.text()
    for status, body, digest in blobs:
        assert status == 200 and body == data and digest == layer
    for status, body, digest in tags:
        assert status == 200 and digest == image.target.digest
        assert "sha256:" + hashlib.sha256(body).hexdigest() == image.target.digest
    assert len(upstream.requests("GET", f"/blobs/{layer}")) == 1
    assert len(upstream.requests("GET", "/manifests/1.0")) == 1
    assert 'peermirror_inflight_upstream_fetches_total{outcome="completed"} 1.0' in metrics


async def test_an_unusable_spool_directory_turns_shared_first_pulls_off_not_the_registry(
    tmp_path: Path, upstream: DistributionRegistry, image: BuiltImage
) -> None:
    # A read-only root filesystem (a container without a volume for the spool) or a file where
    # the directory should be: the registry still serves, and a miss is a fast 404 again, so
    # containerd pulls itself, as without peermirror.
    not_a_dir = tmp_path / "spool-is-a-file"
    not_a_dir.write_text("", encoding="utf-8")
    logs = tmp_path / "logs"
    with _node(tmp_path, upstream, {"spool_dir": str(not_a_dir / "spool")}) as ports:
        layer = image.platforms[0].layers[0].descriptor.digest
        url = f"{ports.registry_url}/v2/{REPO}/blobs/{layer}?ns={REGISTRY}"
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            status, _, _ = await _get(session, url)
        assert status == 404
        assert upstream.requests("GET", f"/blobs/{layer}") == []
    log = (logs / "registry.stderr").read_text(encoding="utf-8")
    assert "inflight.spool_dir" in log
