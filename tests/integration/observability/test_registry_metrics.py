"""Two registries on loopback (a mirror whose misses go to a peer, named by a fake discovery):
after a pull through the mirror, both /metrics show exactly that pull, and one request id is
found in the mirror's log line and in the peer's."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from services.common.logsetup import configure_logging
from services.common.store.oci_layout import OciLayoutStore
from tests.harness.fake_discovery import FakeDiscovery
from tests.harness.images import BuiltImage, build_image
from tests.harness.metrics_scrape import Samples, scrape
from tests.harness.registry_inproc import RunningRegistry, serve_registry

IMAGE = "docker.io/library/app:1.0"
REPO = "library/app"
TIMEOUT = aiohttp.ClientTimeout(total=20)


@dataclass
class Pair:
    image: BuiltImage
    peer: RunningRegistry
    mirror: RunningRegistry
    discovery: FakeDiscovery
    session: aiohttp.ClientSession

    async def get(
        self, node: RunningRegistry, path: str, **headers: str
    ) -> tuple[int, dict[str, str], bytes]:
        async with self.session.get(
            f"{node.url}{path}", params={"ns": "docker.io"}, headers=headers
        ) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.read()

    async def scrape(self, node: RunningRegistry) -> Samples:
        return await scrape(self.session, node.url)


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    layout = tmp_path / "peer-layout"
    image = build_image(layout, name=IMAGE, layers=2, layer_size=300 * 1024, cheap_data=True)
    async with contextlib.AsyncExitStack() as stack:
        peer_store = await stack.enter_async_context(OciLayoutStore(layout))
        (tmp_path / "peer").mkdir()
        peer = await stack.enter_async_context(serve_registry(peer_store, tmp_path / "peer"))
        discovery = await stack.enter_async_context(FakeDiscovery())
        keys = [IMAGE, *(d.digest for d in image.blobs)]
        discovery.provide(keys, ("127.0.0.1", peer.port))
        mirror_store = await stack.enter_async_context(
            OciLayoutStore(tmp_path / "mirror-layout", create=True)
        )
        (tmp_path / "mirror").mkdir()
        mirror = await stack.enter_async_context(
            serve_registry(mirror_store, tmp_path / "mirror", discovery=discovery.address)
        )
        # Budgets wide enough for a busy shared machine: this test is about counts, not speed.
        relay = mirror.app.ctx.mirror
        assert relay is not None
        relay.settings = dataclasses.replace(
            relay.settings, resolve_timeout=2.0, header_timeout=2.0, peer_timeout=5.0
        )
        session = await stack.enter_async_context(aiohttp.ClientSession(timeout=TIMEOUT))
        yield Pair(image, peer, mirror, discovery, session)


async def pull(pair: Pair, **headers: str) -> int:
    """Pull the image through the mirror as containerd does (tag, then config and layers);
    returns the body bytes received."""
    platform = pair.image.platforms[0]
    status, _, body = await pair.get(pair.mirror, f"/v2/{REPO}/manifests/1.0", **headers)
    assert status == 200
    received = len(body)
    for desc in (platform.config, *(layer.descriptor for layer in platform.layers)):
        status, _, body = await pair.get(pair.mirror, f"/v2/{REPO}/blobs/{desc.digest}", **headers)
        assert status == 200
        assert len(body) == desc.size
        received += len(body)
    return received


async def test_counters_move_by_one_pull(pair: Pair) -> None:
    platform = pair.image.platforms[0]
    blobs = 1 + len(platform.layers)
    before_mirror = await pair.scrape(pair.mirror)
    before_peer = await pair.scrape(pair.peer)
    received = await pull(pair)
    assert received == platform.manifest.size + platform.config.size + sum(
        layer.descriptor.size for layer in platform.layers
    )
    missing = "sha256:" + "0" * 64
    status, _, _ = await pair.get(pair.mirror, f"/v2/{REPO}/blobs/{missing}")
    assert status == 404

    mirror = await pair.scrape(pair.mirror)
    peer = await pair.scrape(pair.peer)

    def moved(after: Samples, before: Samples, name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    requests = "peermirror_mirror_requests_total"
    common = {"registry": "docker.io", "source": "external"}
    assert moved(mirror, before_mirror, requests, kind="manifest", cache="peer_hit", **common) == 1
    assert moved(mirror, before_mirror, requests, kind="blob", cache="peer_hit", **common) == blobs
    assert moved(mirror, before_mirror, requests, kind="blob", cache="miss", **common) == 1
    assert moved(mirror, before_mirror, requests, cache="hit") == 0
    assert moved(mirror, before_mirror, "peermirror_served_bytes_total", source="peer") == received
    assert moved(mirror, before_mirror, "peermirror_served_bytes_total", source="local") == 0
    # One provider only: every relay asked the peer exactly once, no hedge could be fired.
    fetches = "peermirror_peer_fetch_duration_seconds_count"
    assert moved(mirror, before_mirror, fetches, kind="manifest", result="ok") == 1
    assert moved(mirror, before_mirror, fetches, kind="blob", result="ok") == blobs
    assert moved(mirror, before_mirror, fetches, result="error") == 0
    assert moved(mirror, before_mirror, "peermirror_hedges_total") == 0
    resolves = "peermirror_resolve_duration_seconds_count"
    assert moved(mirror, before_mirror, resolves, result="found") == 1 + blobs
    assert moved(mirror, before_mirror, resolves, result="not_found") == 1
    assert mirror.value("peermirror_mirror_recent_requests", cache="peer_hit") == 1 + blobs
    assert mirror.value("peermirror_mirror_recent_requests", cache="miss") == 1
    assert mirror.value("peermirror_peers_quarantined") == 0
    assert mirror.value("peermirror_mirror_requests_in_flight") == 0
    assert mirror.value("peermirror_build_info", service="registry") == 1

    # The peer answered the same requests from its own content, to another node.
    inside = {"registry": "docker.io", "source": "internal", "cache": "hit"}
    assert moved(peer, before_peer, requests, kind="manifest", **inside) == 1
    assert moved(peer, before_peer, requests, kind="blob", **inside) == blobs
    assert moved(peer, before_peer, requests, source="external") == 0
    assert moved(peer, before_peer, "peermirror_served_bytes_total", source="local") == received
    assert moved(peer, before_peer, "peermirror_resolve_duration_seconds_count") == 0
    # Relayed requests from peers are not part of the peer's own clients' hit rate.
    assert peer.value("peermirror_mirror_recent_requests") == 0


async def test_metrics_route_is_not_counted_as_a_request(pair: Pair) -> None:
    await pair.scrape(pair.mirror)
    samples = await pair.scrape(pair.mirror)
    assert samples.value("peermirror_mirror_requests_total") == 0
    assert pair.mirror.app.ctx.stats.requests.total() == 0


async def test_one_request_id_in_the_mirror_and_the_peer_log(pair: Pair) -> None:
    out = io.StringIO()
    configure_logging("registry", level="info", stream=out)
    try:
        status, headers, _ = await pair.get(
            pair.mirror, f"/v2/{REPO}/manifests/1.0", **{"X-Request-Id": "pull-7f3a"}
        )
        assert status == 200
        assert headers["x-request-id"] == "pull-7f3a"
        # Without an incoming id the registry makes one, and says which.
        status, headers, _ = await pair.get(pair.mirror, f"/v2/{REPO}/manifests/1.0")
        made = headers["x-request-id"]
        assert len(made) == 32 and made != "pull-7f3a"
    finally:
        configure_logging("registry", level="info")
    lines = [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]
    requests = [line for line in lines if line.get("event") == "request"]
    traced = [line for line in requests if line.get("request_id") == "pull-7f3a"]
    by_source = {line["source"]: line for line in traced}
    assert set(by_source) == {"external", "internal"}, traced
    assert by_source["external"]["result"] == "peer_hit"
    assert by_source["internal"]["result"] == "local_hit"
    for line in traced:
        assert line["path"] == f"/v2/{REPO}/manifests/1.0"
        assert line["level"] == "info"
    assert {line["source"] for line in requests if line.get("request_id") == made} == {
        "external",
        "internal",
    }
