"""A real registry (Sanic on loopback) serving an in-flight blob from its spool: a local client's
miss starts the one upstream fetch (a slow HTTP upstream on loopback), and peers' requests for
the digest wait for bytes instead of getting 404, with Range and HEAD, while it is in flight."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from services.common.config import InflightSection
from services.common.store.oci_layout import OciLayoutStore
from services.registry.headers import DIGEST_HEADER, PEER_HEADER
from services.registry.inflight.coordinator import Coordinator, InflightSettings
from services.registry.inflight.ports import Holder
from services.registry.inflight.spool import SpoolPool
from services.registry.inflight.spool_state import SpoolPhase
from tests.harness.fake_router import FakeRouter, LeaseTable
from tests.harness.inflight_cluster import inflight_cluster
from tests.harness.registry_inproc import RunningRegistry, serve_registry
from tests.harness.slow_upstream import SlowUpstream, SlowUpstreamClient, serve_slow_upstream
from tests.harness.wait import wait_until

MiB = 1 << 20
NS = "upstream.test"
REPO = "library/app"
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=30)
# Bound on waiting for what another task's I/O makes true.
SETTLE_S = 10.0
PEER = {PEER_HEADER: "1"}


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Node:
    registry: RunningRegistry
    upstream: SlowUpstream
    coordinator: Coordinator
    advertiser: FakeRouter
    leases: LeaseTable

    def url(self, digest: str) -> str:
        return f"{self.registry.url}/v2/{REPO}/blobs/{digest}?ns={NS}"


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    async with serve_slow_upstream(SlowUpstream()) as upstream:
        client = SlowUpstreamClient(upstream.port)
        leases = LeaseTable()
        advertiser = FakeRouter()
        coordinator = Coordinator(
            InflightSettings(InflightSection(stall_timeout=20)),
            SpoolPool(tmp_path / "spool", 64 * MiB, grace_s=60),
            leases.client(Holder("127.0.0.1", 0)),
            client,
            advertiser,
        )
        store = OciLayoutStore(tmp_path / "layout", create=True)
        try:
            async with serve_registry(store, tmp_path, inflight=coordinator) as registry:
                yield Node(registry, upstream, coordinator, advertiser, leases)
        finally:
            await client.close()
            await store.close()


async def _get(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str]
) -> tuple[int, dict[str, str], bytes]:
    async with session.get(url, headers=headers) as response:
        return response.status, dict(response.headers), await response.read()


async def _in_flight_on(coordinator: Coordinator, digest: str) -> None:
    await wait_until(
        lambda: digest in coordinator.fetches, SETTLE_S, what="the upstream fetch starting"
    )


async def _in_flight(node: Node, digest: str) -> None:
    await _in_flight_on(node.coordinator, digest)


async def test_peer_requests_for_an_in_flight_blob_wait_for_the_spool(node: Node) -> None:
    blob = os.urandom(3 * MiB + 12345)
    digest = _digest(blob)
    node.upstream.blobs[digest] = blob
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        # Before anything is in flight, a peer request is a plain miss (404, fast).
        status, _, _ = await _get(session, node.url(digest), PEER)
        assert status == 404
        local = asyncio.create_task(_get(session, node.url(digest), {}))
        await _in_flight(node, digest)
        # A range far past the bytes upstream has sent so far (it holds back after 256 KiB).
        far = {**PEER, "Range": f"bytes={2 * MiB}-{2 * MiB + 99_999}"}
        ranged = asyncio.create_task(_get(session, node.url(digest), far))
        whole = asyncio.create_task(_get(session, node.url(digest), PEER))
        beyond = {**PEER, "Range": f"bytes={len(blob)}-"}
        async with session.get(node.url(digest), headers=beyond) as refused:
            assert refused.status == 416
            assert refused.headers["Content-Range"] == f"bytes */{len(blob)}"
            assert (await refused.json())["errors"][0]["code"] == "RANGE_INVALID"
        async with session.head(node.url(digest), headers=PEER) as head:
            assert head.status == 200
            assert head.headers["Content-Length"] == str(len(blob))
            assert head.headers[DIGEST_HEADER] == digest
        # A fixed pause on purpose: it shows that no reader finishes early; nothing happening
        # is the point, so there is no condition to await.
        await asyncio.sleep(0.3)
        assert not ranged.done() and not whole.done() and not local.done(), (
            "readers must wait for bytes upstream has not sent yet"
        )
        spool = node.coordinator.pool.get(digest)
        assert spool is not None and spool.state.written < 2 * MiB
        node.upstream.gate.set()
        status, headers, body = await ranged
        assert status == 206
        assert headers["Content-Range"] == f"bytes {2 * MiB}-{2 * MiB + 99_999}/{len(blob)}"
        assert body == blob[2 * MiB : 2 * MiB + 100_000]
        for task in (whole, local):
            status, headers, body = await task
            assert status == 200 and body == blob
            assert headers[DIGEST_HEADER] == digest
        async with session.get(f"{node.registry.url}/metrics") as response:
            metrics = await response.text()
    assert 'peermirror_inflight_upstream_fetches_total{outcome="completed"} 1.0' in metrics
    peer_waiters = re.search(
        r'^peermirror_inflight_coalesced_waiters_total\{waiter="peer"\} (\S+)$', metrics, re.M
    )
    assert peer_waiters is not None and float(peer_waiters.group(1)) >= 3
    assert "peermirror_inflight_fetches 0.0" in metrics
    # One upstream request for the whole cluster's worth of readers.
    assert [path for path, _ in node.upstream.requests] == [f"/v2/{REPO}/blobs/{digest}"]
    assert node.advertiser.advertised == [digest]
    assert spool.state.phase is SpoolPhase.COMPLETE
    assert node.coordinator.counters.coalesced["peer"] >= 2


async def test_a_peer_asking_before_the_upstream_answered_waits_for_the_spool(
    node: Node,
) -> None:
    """The lease is granted before the upstream's headers give the blob's size, so the spool
    comes a moment after it: a waiter that asks in that moment gets the blob, not a 404 that
    costs it a retry round."""
    blob = os.urandom(MiB + 4321)
    digest = _digest(blob)
    node.upstream.blobs[digest] = blob
    node.upstream.blob_delay = 1.0
    node.upstream.gate.set()
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        local = asyncio.create_task(_get(session, node.url(digest), {}))
        await wait_until(
            lambda: bool(node.upstream.requests), SETTLE_S, what="the upstream blob request"
        )
        assert node.coordinator.pool.get(digest) is None, "the spool must not exist yet"
        peer = await _get(session, node.url(digest), PEER)
        mine = await local
    for status, headers, body in (peer, mine):
        assert status == 200 and body == blob
        assert headers[DIGEST_HEADER] == digest
    assert [path for path, _ in node.upstream.requests] == [f"/v2/{REPO}/blobs/{digest}"]


async def test_local_client_gone_does_not_stop_the_fetch(node: Node) -> None:
    blob = os.urandom(2 * MiB)
    digest = _digest(blob)
    node.upstream.blobs[digest] = blob
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        response = await session.get(node.url(digest))
        assert response.status == 200
        await response.content.readexactly(1000)
        response.close()  # containerd gave up on this request
    # The registry let go of that request before upstream sends on.
    stats = node.registry.app.ctx.stats
    await wait_until(lambda: stats.in_flight == 0, SETTLE_S, what="the request let go")
    node.upstream.gate.set()
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        status, _, body = await _get(session, node.url(digest), PEER)
    assert status == 200 and body == blob
    assert len(node.upstream.requests) == 1


async def test_corrupt_upstream_body_is_never_completed(node: Node) -> None:
    blob = os.urandom(MiB)
    digest = _digest(blob)
    node.upstream.blobs[digest] = blob
    node.upstream.corrupt.add(digest)
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        local = await session.get(node.url(digest))
        await _in_flight(node, digest)
        peer = await session.get(node.url(digest), headers=PEER)
        node.upstream.gate.set()
        for response in (local, peer):
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
            response.close()
        # The failed spool is gone: the next peer request is a plain miss again.
        status, _, _ = await _get(session, node.url(digest), PEER)
        assert status == 404
    assert node.leases.held == {}


async def test_waiting_node_relays_from_the_lease_holder(tmp_path: Path) -> None:
    """Two registries, one upstream fetch: B's miss finds the lease held by A and relays A's
    growing spool through the ordinary peer relay once discovery names A."""
    blob = os.urandom(2 * MiB + 777)
    digest = _digest(blob)
    async with (
        serve_slow_upstream(SlowUpstream(blobs={digest: blob})) as upstream,
        inflight_cluster(tmp_path, 2, upstream.port, advertise_delay=0.3) as (a, b),
    ):
        url = f"/v2/{REPO}/blobs/{digest}?ns={NS}"
        async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
            pull_a = asyncio.create_task(_get(session, a.registry.url + url, {}))
            await _in_flight_on(a.coordinator, digest)
            pull_b = asyncio.create_task(_get(session, b.registry.url + url, {}))
            await wait_until(
                lambda: b.coordinator.counters.coalesced["remote_holder"] >= 1,
                SETTLE_S,
                what="B finding the lease held",
            )
            await wait_until(
                lambda: digest in a.discovery.providers, SETTLE_S, what="A's advertisement"
            )
            upstream.gate.set()
            for pull in (pull_a, pull_b):
                status, headers, body = await pull
                assert status == 200 and body == blob
                assert headers[DIGEST_HEADER] == digest
        assert len(upstream.requests) == 1, upstream.requests
        assert b.coordinator.counters.fetches_started == 0
        assert a.coordinator.counters.coalesced["peer"] >= 1


MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
MANIFEST_BODY = (
    b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",'
    b'"config":{"mediaType":"application/vnd.oci.image.config.v1+json","size":2,'
    b'"digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"},'
    b'"layers":[]}'
)


async def test_concurrent_tag_pulls_cost_one_upstream_manifest_request(node: Node) -> None:
    node.upstream.manifests["1.0"] = (MANIFEST_TYPE, MANIFEST_BODY)
    node.upstream.manifests["latest"] = (MANIFEST_TYPE, MANIFEST_BODY)
    node.upstream.manifest_delay = 0.2
    base = f"{node.registry.url}/v2/{REPO}/manifests"
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        answers = await asyncio.gather(
            *(_get(session, f"{base}/1.0?ns={NS}", {}) for _ in range(4))
        )
        # containerd's next request, by digest, is answered from the window too.
        pinned = await _get(session, f"{base}/{_digest(MANIFEST_BODY)}?ns={NS}", {})
        # A peer asking within the window is served from it, by tag and by digest.
        by_tag = await _get(session, f"{base}/1.0?ns={NS}", PEER)
        by_digest = await _get(session, f"{base}/{_digest(MANIFEST_BODY)}?ns={NS}", PEER)
        # `latest` is refused by policy before anything is asked of upstream.
        latest, _, _ = await _get(session, f"{base}/latest?ns={NS}", {})
        # Past the window the tag is not served from memory any more (a window that must
        # really elapse: polling for the 404 would not show when it came).
        await asyncio.sleep(node.coordinator.settings.section.manifest_window + 0.2)
        expired, _, _ = await _get(session, f"{base}/1.0?ns={NS}", PEER)
    assert expired == 404
    for status, headers, body in [*answers, pinned, by_tag, by_digest]:
        assert status == 200 and body == MANIFEST_BODY
        assert headers[DIGEST_HEADER] == _digest(MANIFEST_BODY)
        assert headers["Content-Type"] == MANIFEST_TYPE
    assert latest == 404
    assert node.upstream.requests == [(f"/v2/{REPO}/manifests/1.0", None)]
    assert node.advertiser.advertised == [f"{NS}/{REPO}:1.0", _digest(MANIFEST_BODY)]


async def test_a_peer_asking_for_a_manifest_being_fetched_waits_for_it(node: Node) -> None:
    """A waiter told that this node holds a tag's lease asks it before the upstream answered:
    it gets the manifest once it is in, not a 404 that costs it a retry round."""
    node.upstream.manifests["1.0"] = (MANIFEST_TYPE, MANIFEST_BODY)
    node.upstream.manifest_delay = 1.0
    base = f"{node.registry.url}/v2/{REPO}/manifests"
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        local = asyncio.create_task(_get(session, f"{base}/1.0?ns={NS}", {}))
        await wait_until(
            lambda: bool(node.upstream.requests), SETTLE_S, what="the upstream manifest request"
        )
        by_tag = asyncio.create_task(_get(session, f"{base}/1.0?ns={NS}", PEER))
        async with session.head(f"{base}/1.0?ns={NS}", headers=PEER) as head:
            head_status = head.status
            head_digest = head.headers.get(DIGEST_HEADER)
        answers = [await local, await by_tag]
    assert head_status == 200 and head_digest == _digest(MANIFEST_BODY)
    for status, headers, body in answers:
        assert status == 200 and body == MANIFEST_BODY
        assert headers[DIGEST_HEADER] == _digest(MANIFEST_BODY)
    assert node.upstream.requests == [(f"/v2/{REPO}/manifests/1.0", None)]


async def test_a_peer_asking_for_a_manifest_another_node_fetches_is_a_miss(node: Node) -> None:
    """Only a fetch this node runs is waited for: a manifest another node holds the lease on
    (this node is itself waiting) is a plain miss for a peer."""
    node.upstream.manifests["1.0"] = (MANIFEST_TYPE, MANIFEST_BODY)
    # Another node holds the tag's lease: this node's claim turns into HeldElsewhere, and its
    # own client gets its 404 after a short wait for that holder.
    await node.leases.client(Holder("127.0.0.9", 1)).acquire(f"{NS}/{REPO}:1.0")
    node.coordinator.settings = InflightSettings(InflightSection(stall_timeout=20, holder_wait=2))
    base = f"{node.registry.url}/v2/{REPO}/manifests"
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        local = asyncio.create_task(_get(session, f"{base}/1.0?ns={NS}", {}))
        status, _, _ = await _get(session, f"{base}/1.0?ns={NS}", PEER)
        assert status == 404
        local_status, _, _ = await local
    assert local_status == 404
    assert node.upstream.requests == []


async def test_holder_lost_mid_fetch_the_waiter_takes_over(tmp_path: Path) -> None:
    """A, the lease holder, dies with its fetch stalled part-way; B's pull finds A gone, keeps
    asking, takes the lease once A's runs out and fetches itself: it completes and verifies."""
    blob = os.urandom(2 * MiB)
    digest = _digest(blob)
    async with (
        serve_slow_upstream(SlowUpstream(blobs={digest: blob})) as upstream,
        inflight_cluster(tmp_path, 2, upstream.port, lease_ttl=2.0) as (a, b),
    ):
        url = f"/v2/{REPO}/blobs/{digest}?ns={NS}"
        async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
            pull_a = asyncio.create_task(_get(session, a.registry.url + url, {}))
            await _in_flight_on(a.coordinator, digest)
            await a.crash()  # A is gone: its fetch and spool with it, its lease left to expire
            (outcome,) = await asyncio.gather(pull_a, return_exceptions=True)
            # A's client never got a complete body.
            if not isinstance(outcome, BaseException):
                assert len(outcome[2]) < len(blob)
            pull_b = asyncio.create_task(_get(session, b.registry.url + url, {}))
            await _in_flight_on(b.coordinator, digest)
            upstream.gate.set()
            status, headers, body = await pull_b
        assert status == 200 and body == blob
        assert headers[DIGEST_HEADER] == digest
        # B was told A holds the lease until A's ran out.
        assert b.coordinator.counters.coalesced["remote_holder"] >= 1
        assert b.coordinator.counters.fetches_started == 1
        assert len(upstream.requests) == 2
