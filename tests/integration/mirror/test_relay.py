"""The mirror path end to end over loopback: a registry with an empty store serves an image held
by peers it finds through (fake) discovery, through fault proxies that misbehave on demand."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from services.registry.headers import DIGEST_HEADER, PEER_HEADER
from services.registry.stats import RequestKind, Result
from tests.fuzz.raw_http import build_request, exchange
from tests.harness.fault_proxy import FaultProxy
from tests.harness.wait import wait_until
from tests.integration.mirror.conftest import SETTLE_S, Cluster

# Discovery's fake ends its streams at once, so a long resolve wait costs nothing; it only makes
# sure every provider is seen however loaded the machine is.
PATIENT: dict[str, Any] = {"resolve_timeout": 10.0}
# Budgets that keep hedging out of tests about something else, whatever the machine's load.
NO_HEDGE: dict[str, Any] = {**PATIENT, "header_timeout": 30.0, "peer_timeout": 30.0}


def _error(body: bytes) -> dict[str, object]:
    errors = json.loads(body)["errors"]
    assert len(errors) == 1
    entry: dict[str, object] = errors[0]
    return entry


async def test_manifest_by_tag_and_digest_is_relayed_and_verified(cluster: Cluster) -> None:
    cluster.discovery.hold_open = True  # the first provider is used without waiting for more
    manifest_body = cluster.image.read_blob(cluster.manifest)
    async with cluster.mirror(**NO_HEDGE) as mirror:
        for reference in ("1.0", cluster.manifest):
            status, headers, body = await cluster.get(mirror, f"library/app/manifests/{reference}")
            assert status == 200
            assert body == manifest_body
            assert headers[DIGEST_HEADER] == cluster.manifest
            assert headers["Content-Type"] == cluster.image.target.media_type
            assert int(headers["Content-Length"]) == len(manifest_body)
            status, headers, body = await cluster.get(
                mirror, f"library/app/manifests/{reference}", method="HEAD"
            )
            assert (status, body) == (200, b"")
            assert headers[DIGEST_HEADER] == cluster.manifest
        stats = mirror.app.ctx.stats
        assert stats.count(RequestKind.MANIFEST, Result.PEER_HIT) == 4
        assert stats.bytes_relayed == 2 * len(manifest_body)
    seen = cluster.proxies[0].requests
    assert [r.headers[PEER_HEADER.lower()] for r in seen] == ["1"] * 4
    assert all("ns=docker.io" in r.target for r in seen)
    assert cluster.discovery.lookups[0] == "docker.io/library/app:1.0"
    assert cluster.manifest in cluster.discovery.lookups


async def test_blob_is_relayed_whole_partial_and_head(cluster: Cluster) -> None:
    layer = cluster.image.read_blob(cluster.layer)
    path = f"library/app/blobs/{cluster.layer}"
    async with cluster.mirror(**NO_HEDGE) as mirror:
        status, headers, body = await cluster.get(mirror, path)
        assert status == 200
        assert body == layer
        assert headers[DIGEST_HEADER] == cluster.layer
        status, headers, body = await cluster.get(mirror, path, Range="bytes=10-99")
        assert status == 206
        assert body == layer[10:100]
        assert headers["Content-Range"] == f"bytes 10-99/{len(layer)}"
        status, headers, body = await cluster.get(mirror, path, method="HEAD")
        assert (status, body) == (200, b"")
        assert int(headers["Content-Length"]) == len(layer)
        assert mirror.app.ctx.stats.count(RequestKind.BLOB, Result.PEER_HIT) == 3
    # The range is cut from the whole blob, read and verified: the peer is asked for all of it.
    assert "range" not in cluster.proxies[0].requests[1].headers


def _ranges_asked(proxies: list[FaultProxy]) -> list[str | None]:
    return [r.headers.get("range") for p in proxies for r in p.requests]


async def test_peer_cut_mid_body_is_resumed_from_the_next_peer(cluster: Cluster) -> None:
    layer = cluster.image.read_blob(cluster.layer)
    cut = 1024 * 1024 + 123
    first = cluster.proxies[0]
    first.faults.truncate_at = cut
    async with cluster.mirror(**NO_HEDGE) as mirror:
        status, _, body = await cluster.get(mirror, f"library/app/blobs/{cluster.layer}")
        assert status == 200
        assert body == layer
        assert not cluster.quarantined(mirror, first)
    # The rest was asked of another peer by Range (a fresh node may also have probed one's
    # rate: the resume goes to a peer not busy with that probe).
    assert f"bytes={cut}-{len(layer) - 1}" in _ranges_asked(cluster.proxies[1:])


async def test_corrupt_peer_bytes_abort_the_client_and_quarantine_the_peer(
    cluster: Cluster,
) -> None:
    layer = cluster.image.read_blob(cluster.layer)
    bad, good = cluster.proxies[0], cluster.proxies[1]
    bad.faults.corrupt_at = 2 * 1024 * 1024 + 7
    path = f"library/app/blobs/{cluster.layer}"
    async with cluster.mirror(**NO_HEDGE) as mirror:
        received = b""
        with pytest.raises(aiohttp.ClientPayloadError):
            async with cluster.session.get(f"{mirror.url}/v2/{path}?ns=docker.io") as resp:
                assert resp.status == 200
                async for chunk in resp.content.iter_any():
                    received += chunk
        # Whatever arrived is a strict prefix of the right body: never a complete wrong one.
        assert len(received) < len(layer)
        assert cluster.quarantined(mirror, bad)
        asked_bad = len(bad.requests)
        # (good may have completed a rate probe already: a fresh node measures another provider)
        completed_good = good.completed
        status, _, body = await cluster.get(mirror, path)
        assert status == 200
        assert body == layer
        assert len(bad.requests) == asked_bad
        assert good.completed == completed_good + 1
        assert mirror.app.ctx.stats.count(RequestKind.BLOB, Result.ERROR) == 1


async def test_manifest_with_a_wrong_digest_header_falls_to_the_next_peer(
    cluster: Cluster,
) -> None:
    bad, good = cluster.proxies[0], cluster.proxies[1]
    bad.faults.digest_header = "sha256:" + "0" * 64
    async with cluster.mirror(**NO_HEDGE) as mirror:
        status, headers, body = await cluster.get(mirror, "library/app/manifests/1.0")
        assert status == 200
        assert headers[DIGEST_HEADER] == cluster.manifest
        assert body == cluster.image.read_blob(cluster.manifest)
        status, _, _ = await cluster.get(mirror, f"library/app/manifests/{cluster.manifest}")
        assert status == 200
    assert len(bad.requests) == 1  # quarantined after the first lie
    assert good.completed == 2


async def test_late_headers_fire_a_hedge_and_the_fast_peer_wins(cluster: Cluster) -> None:
    slow, fast = cluster.proxies[0], cluster.proxies[1]
    slow.faults.header_delay = 60.0
    cluster.provide(slow, fast)
    # Only a hedge can answer: the slow peer's own timeout is far beyond the client's.
    async with cluster.mirror(**PATIENT, header_timeout=0.05, peer_timeout=60.0) as mirror:
        status, _, body = await cluster.get(mirror, "library/app/manifests/1.0")
        assert status == 200
        assert body == cluster.image.read_blob(cluster.manifest)
        status, _, body = await cluster.get(mirror, f"library/app/blobs/{cluster.layer}")
        assert status == 200
        assert body == cluster.image.read_blob(cluster.layer)
        assert fast.completed == 2
        # The losing requests were cancelled: the slow peer saw its clients leave.
        await wait_until(
            lambda: slow.abandoned == len(slow.requests) >= 1, SETTLE_S, what="slow peer abandoned"
        )
        assert slow.completed == 0


async def test_no_provider_is_a_404_with_the_attempt_count(cluster: Cluster) -> None:
    cluster.discovery.providers.clear()
    async with cluster.mirror() as mirror:
        status, _, body = await cluster.get(mirror, "library/app/manifests/1.0")
        assert status == 404
        error = _error(body)
        assert error["code"] == "MANIFEST_UNKNOWN"
        assert error["detail"] == {
            "tag": "docker.io/library/app:1.0",
            "attempts": 0,
            "providers": 0,
        }
        assert mirror.app.ctx.stats.count(RequestKind.MANIFEST, Result.NOT_FOUND) == 1


async def test_every_peer_failing_is_a_404_with_the_attempt_count(cluster: Cluster) -> None:
    for proxy in cluster.proxies:
        proxy.faults.refuse = True
    async with cluster.mirror(**PATIENT) as mirror:
        status, _, body = await cluster.get(mirror, f"library/app/blobs/{cluster.layer}")
        assert status == 404
        error = _error(body)
        assert error["code"] == "BLOB_UNKNOWN"
        assert isinstance(error["detail"], dict)
        assert error["detail"]["attempts"] == 3
        assert error["detail"]["providers"] == 3


async def test_hanging_discovery_and_peers_end_in_a_404(cluster: Cluster) -> None:
    cluster.discovery.first_delay = 30.0
    async with cluster.mirror() as mirror:
        status, _, body = await cluster.get(mirror, "library/app/manifests/1.0")
        assert status == 404
        assert _error(body)["detail"] == {
            "tag": "docker.io/library/app:1.0",
            "attempts": 0,
            "providers": 0,
        }
    cluster.discovery.first_delay = 0.0
    cluster.proxies[0].faults.hang = True
    cluster.provide(cluster.proxies[0])
    async with cluster.mirror("mirror2", **PATIENT, peer_timeout=0.3) as mirror:
        status, _, body = await cluster.get(mirror, f"library/app/blobs/{cluster.layer}")
        assert status == 404
        assert _error(body)["detail"] == {
            "digest": cluster.layer,
            "attempts": 1,
            "providers": 1,
        }


async def test_peer_requests_are_never_relayed(cluster: Cluster) -> None:
    async with cluster.mirror() as mirror:
        for path in ("library/app/manifests/1.0", f"library/app/blobs/{cluster.layer}"):
            status, _, _ = await cluster.get(mirror, path, **{PEER_HEADER: "1"})
            assert status == 404
        assert mirror.app.ctx.stats.count(RequestKind.BLOB, Result.REFUSED, from_peer=True) == 1
    assert cluster.discovery.lookups == []
    assert all(p.connections == 0 for p in cluster.proxies)


async def test_policy_applies_before_peers_are_asked(cluster: Cluster) -> None:
    cluster.discovery.provide(["docker.io/library/app:latest"], cluster.proxies[0].contact)
    async with cluster.mirror(mirrors=["docker.io"]) as mirror:
        status, _, _ = await cluster.get(mirror, "library/app/manifests/latest")
        assert status == 404
        status, _, _ = await cluster.get(mirror, "library/app/manifests/1.0", ns="quay.io")
        assert status == 404
        assert mirror.app.ctx.stats.count(RequestKind.MANIFEST, Result.REFUSED) == 2
    assert cluster.discovery.lookups == []


async def test_the_upstream_registry_is_never_dialled(cluster: Cluster) -> None:
    dialled: list[int] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        dialled.append(1)
        writer.close()

    upstream = await asyncio.start_server(record, "127.0.0.1", 0)
    ns = f"127.0.0.1:{upstream.sockets[0].getsockname()[1]}"
    try:
        async with cluster.mirror() as mirror:
            status, _, body = await cluster.get(mirror, f"library/app/blobs/{cluster.layer}", ns=ns)
            assert status == 200
            assert body == cluster.image.read_blob(cluster.layer)
            status, _, _ = await cluster.get(mirror, "library/app/manifests/1.0", ns=ns)
            assert status == 404
    finally:
        upstream.close()
        await upstream.wait_closed()
    assert dialled == []
    assert f"ns={ns}" in cluster.proxies[0].requests[0].target


async def test_a_client_range_is_read_whole_and_resumed_to_the_blob_end(cluster: Cluster) -> None:
    layer = cluster.image.read_blob(cluster.layer)
    first = cluster.proxies[0]
    first.faults.truncate_at = 500_000
    async with cluster.mirror(**NO_HEDGE) as mirror:
        status, headers, body = await cluster.get(
            mirror, f"library/app/blobs/{cluster.layer}", Range="bytes=1000-1999999"
        )
        assert status == 206
        assert headers["Content-Range"] == f"bytes 1000-1999999/{len(layer)}"
        assert body == layer[1000:2000000]
    assert "range" not in first.requests[0].headers
    assert f"bytes=500000-{len(layer) - 1}" in _ranges_asked(cluster.proxies[1:])


@pytest.mark.parametrize(
    ("client_range", "corrupt_at"),
    [
        # The corrupt byte is inside the range asked for ...
        ("bytes=2000000-2199999", 2 * 1024 * 1024 + 7),
        # ... or past its end: the range's own bytes are right, but they come from a blob
        # that is not the one asked for, so the answer is not completed either.
        ("bytes=0-99", 2 * 1024 * 1024 + 7),
    ],
)
async def test_a_client_range_from_a_corrupt_peer_is_never_completed(
    cluster: Cluster, client_range: str, corrupt_at: int
) -> None:
    layer = cluster.image.read_blob(cluster.layer)
    bad = cluster.proxies[0]
    bad.faults.corrupt_at = corrupt_at
    path = f"library/app/blobs/{cluster.layer}"
    async with cluster.mirror(**NO_HEDGE) as mirror:
        # A raw exchange: aiohttp would quietly retry a request whose connection closed before
        # the response head, and the retry (to a good peer) would hide what this answer was.
        port = int(mirror.url.rsplit(":", 1)[1])
        request = build_request("GET", f"/v2/{path}?ns=docker.io", [("Range", client_range)])
        answer = await asyncio.to_thread(exchange, port, request)
        # No answer, or a 206 whose body stops short of its length: never a complete one.
        if answer is not None:
            assert answer.status == 206
            assert len(answer.body) < int(answer.headers["content-length"])
        assert cluster.quarantined(mirror, bad)
        # The retry goes to a good peer and completes.
        status, _, body = await cluster.get(mirror, path, Range=client_range)
        first, last = (int(x) for x in client_range.removeprefix("bytes=").split("-"))
        assert (status, body) == (206, layer[first : last + 1])


async def test_a_client_range_past_the_blob_is_a_416(cluster: Cluster) -> None:
    layer = cluster.image.read_blob(cluster.layer)
    async with cluster.mirror(**NO_HEDGE) as mirror:
        status, headers, body = await cluster.get(
            mirror, f"library/app/blobs/{cluster.layer}", Range=f"bytes={len(layer)}-"
        )
    assert status == 416
    assert headers["Content-Range"] == f"bytes */{len(layer)}"
    assert json.loads(body)["errors"][0]["code"] == "RANGE_INVALID"
