"""The in-flight coordinator with in-memory fakes: one upstream fetch per blob for the cluster,
waiters, fallbacks, holder loss, broken and corrupt upstream bodies, and the manifest window."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sanic import HTTPResponse

from services.common.config import InflightSection
from services.common.oci.errors import ErrorCode, OciError
from services.registry.inflight.coordinator import (
    Coordinator,
    Fetching,
    HeldElsewhere,
    InflightSettings,
    Unavailable,
)
from services.registry.inflight.ports import Holder, LeaseAnswer, UpstreamManifest
from services.registry.inflight.serving import answer_local_miss
from services.registry.inflight.spool import SpoolPool
from services.registry.inflight.spool_state import SpoolFailedError, SpoolPhase
from services.registry.paths import parse_v2_path
from tests.harness.fake_inflight import CountingLimiter, FakeUpstream, sha256
from tests.harness.fake_router import FakeRouter, LeaseTable
from tests.harness.wait import wait_until

BLOB = os.urandom(1_000_000)
NODE_A = Holder("10.0.0.1", 6443)
NODE_B = Holder("10.0.0.2", 6443)
REGISTRY = "docker.io"
REPO = "library/app"
# Bound on waiting for what the coordinator's background tasks make true.
WAIT_S = 10.0


def _node(
    tmp_path: Path,
    table: LeaseTable,
    me: Holder,
    upstream: FakeUpstream,
    *,
    max_bytes: int = 64 << 20,
    limiter: CountingLimiter | None = None,
    **settings: Any,
) -> tuple[Coordinator, FakeRouter]:
    pool = SpoolPool(tmp_path / me.address, max_bytes, grace_s=60)
    pool.open()
    advertiser = FakeRouter()
    retry = settings.pop("retry_interval_s", 0.2)
    defaults: dict[str, Any] = {"renew_interval": 0.05, "stall_timeout": 5.0, "holder_wait": 2.0}
    coordinator = Coordinator(
        InflightSettings(InflightSection(**(defaults | settings)), retry_interval_s=retry),
        pool,
        table.client(me),
        upstream,
        advertiser,
        limiter,
    )
    return coordinator, advertiser


async def _read_all(coordinator: Coordinator, claim: object) -> bytes:
    assert isinstance(claim, Fetching), claim
    spool = claim.spool
    parts = [c async for c in spool.read(0, spool.size, coordinator.settings.section.stall_timeout)]
    await spool.verdict(coordinator.settings.section.stall_timeout)
    return b"".join(parts)


async def _settled(coordinator: Coordinator) -> None:
    """Until no fetch is running (what follows one, the lease's release or keeping, runs on)."""
    await wait_until(lambda: not coordinator.fetches, WAIT_S, 0.01, what="the fetch ending")


async def _withdrawn(advertiser: FakeRouter, digest: str) -> None:
    """Until a failed fetch's aftermath is done: the lease released, then `digest` withdrawn."""
    await wait_until(lambda: digest in advertiser.withdrawn, WAIT_S, 0.01, what="the withdrawal")


async def test_concurrent_misses_on_one_node_share_one_upstream_fetch(tmp_path: Path) -> None:
    upstream = FakeUpstream(delay=0.001)
    digest = upstream.add_blob(BLOB)
    node, advertiser = _node(tmp_path, LeaseTable(), NODE_A, upstream)
    claims = await asyncio.gather(*(node.claim_blob(REGISTRY, REPO, digest) for _ in range(5)))
    bodies = await asyncio.gather(*(_read_all(node, c) for c in claims))
    assert all(body == BLOB for body in bodies)
    assert upstream.blob_calls == [(digest, 0)]
    assert node.counters.coalesced["local"] == 4
    assert advertiser.advertised == [digest]
    await node.close()


async def test_second_node_is_sent_to_the_holder(tmp_path: Path) -> None:
    upstream = FakeUpstream(gate=asyncio.Event())
    digest = upstream.add_blob(BLOB)
    table = LeaseTable()
    a, _ = _node(tmp_path, table, NODE_A, upstream)
    b, _ = _node(tmp_path, table, NODE_B, upstream)
    assert isinstance(await a.claim_blob(REGISTRY, REPO, digest), Fetching)
    claim = await b.claim_blob(REGISTRY, REPO, digest)
    assert claim == HeldElsewhere(NODE_A)
    assert b.counters.coalesced["remote_holder"] == 1
    assert len(upstream.blob_calls) == 1
    await a.close()
    await b.close()


async def test_fetch_goes_on_when_its_client_disconnects(tmp_path: Path) -> None:
    gate = asyncio.Event()
    upstream = FakeUpstream(gate=gate)
    digest = upstream.add_blob(BLOB)
    table = LeaseTable()
    node, _ = _node(tmp_path, table, NODE_A, upstream)
    claim = await node.claim_blob(REGISTRY, REPO, digest)
    client = asyncio.create_task(_read_all(node, claim))
    assert isinstance(claim, Fetching)
    await wait_until(lambda: claim.spool.readers == 1, WAIT_S, 0.01, what="the client reading")
    client.cancel()  # the client that started the fetch goes away
    with pytest.raises(asyncio.CancelledError):
        await client
    gate.set()
    assert isinstance(claim, Fetching)
    await claim.spool.verdict(5)
    assert claim.spool.state.phase is SpoolPhase.COMPLETE
    await _settled(node)
    # Renewed once more after the end instead of released: the keeping loop runs.
    renewed = table.renewals.count(digest)
    await wait_until(lambda: table.renewals.count(digest) > renewed, WAIT_S, 0.01)
    # The lease stays ours while the complete spool is served (late askers are sent here).
    assert table.held[digest][0] == NODE_A and table.released == []
    # Meanwhile another node's registry can still read it all from the spool.
    spool = await node.peer_spool(digest, WAIT_S)
    assert spool is not None
    assert b"".join([c async for c in spool.read(0, spool.size, 5)]) == BLOB
    await node.close()


async def test_lease_is_renewed_while_fetching(tmp_path: Path) -> None:
    upstream = FakeUpstream(delay=0.02, chunk=100_000)
    digest = upstream.add_blob(BLOB)
    table = LeaseTable()
    node, _ = _node(tmp_path, table, NODE_A, upstream)
    assert await _read_all(node, await node.claim_blob(REGISTRY, REPO, digest)) == BLOB
    assert table.renewals.count(digest) >= 1
    await node.close()


async def test_holder_lost_waiter_takes_the_lease_and_fetches(tmp_path: Path) -> None:
    stuck = asyncio.Event()  # the holder's upstream never sends: it stalls
    stalled = FakeUpstream(gate=stuck)
    healthy = FakeUpstream()
    digest = stalled.add_blob(BLOB)
    healthy.add_blob(BLOB)
    table = LeaseTable()
    a, _ = _node(tmp_path, table, NODE_A, stalled, renew_interval=60)
    b, _ = _node(tmp_path, table, NODE_B, healthy)
    await a.claim_blob(REGISTRY, REPO, digest)
    assert await b.claim_blob(REGISTRY, REPO, digest) == HeldElsewhere(NODE_A)
    table.expire(digest)  # A stopped renewing (died or stalled): its lease runs out
    claim = await b.claim_blob(REGISTRY, REPO, digest)
    assert await _read_all(b, claim) == BLOB
    assert healthy.blob_calls == [(digest, 0)]
    await a.close()
    await b.close()


async def test_broken_upstream_body_resumes_with_a_range(tmp_path: Path) -> None:
    upstream = FakeUpstream(break_at=400_000)
    digest = upstream.add_blob(BLOB)
    node, _ = _node(tmp_path, LeaseTable(), NODE_A, upstream)
    claim = await node.claim_blob(REGISTRY, REPO, digest)
    assert await _read_all(node, claim) == BLOB
    assert upstream.blob_calls == [(digest, 0), (digest, 400_000)]
    await node.close()


async def test_corrupt_upstream_aborts_every_reader_and_withdraws(tmp_path: Path) -> None:
    upstream = FakeUpstream(corrupt=True, delay=0.001)
    digest = upstream.add_blob(BLOB)
    table = LeaseTable()
    node, advertiser = _node(tmp_path, table, NODE_A, upstream)
    claim = await node.claim_blob(REGISTRY, REPO, digest)
    assert isinstance(claim, Fetching)
    peer = await node.peer_spool(digest, WAIT_S)
    assert peer is not None
    readers = [
        asyncio.create_task(_read_all(node, claim)),
        asyncio.create_task(_read_all(node, Fetching(peer))),
    ]
    for reader in readers:
        with pytest.raises(SpoolFailedError, match="do not match"):
            await reader
    await _settled(node)
    await _withdrawn(advertiser, digest)
    assert advertiser.withdrawn == [digest]
    assert table.released == [digest]
    assert node.pool.get(digest) is None
    assert node.counters.fetches_failed == 1
    await node.close()


async def test_spool_bound_exceeded_falls_back_and_releases_the_lease(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    digest = upstream.add_blob(BLOB)
    table = LeaseTable()
    node, advertiser = _node(tmp_path, table, NODE_A, upstream, max_bytes=len(BLOB) - 1)
    claim = await node.claim_blob(REGISTRY, REPO, digest)
    assert isinstance(claim, Unavailable) and "no room" in claim.reason
    assert table.released == [digest]
    assert advertiser.advertised == []
    assert node.counters.fallbacks == 1
    await node.close()


async def test_back_to_source_limit_refuses_a_second_fetch(tmp_path: Path) -> None:
    upstream = FakeUpstream(gate=asyncio.Event())
    first, second = upstream.add_blob(BLOB), upstream.add_blob(BLOB[::-1])
    limiter = CountingLimiter(cap=1)
    node, _ = _node(tmp_path, LeaseTable(), NODE_A, upstream, limiter=limiter)
    assert isinstance(await node.claim_blob(REGISTRY, REPO, first), Fetching)
    claim = await node.claim_blob(REGISTRY, REPO, second)
    assert isinstance(claim, Unavailable) and "back-to-source" in claim.reason
    await node.close()
    assert limiter.in_use == 0


async def test_no_lease_service_or_refusing_upstream_is_a_plain_miss(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    digest = upstream.add_blob(BLOB)
    table = LeaseTable()
    table.down = True
    node, _ = _node(tmp_path, table, NODE_A, upstream)
    claim = await node.claim_blob(REGISTRY, REPO, digest)
    assert isinstance(claim, Unavailable) and "lease" in claim.reason
    table.down = False
    upstream.refuse = PermissionError("401 unauthorized")
    claim = await node.claim_blob(REGISTRY, REPO, digest)
    assert isinstance(claim, Unavailable) and "401" in claim.reason
    assert table.held == {}
    await node.close()


# --- manifests -------------------------------------------------------------------------------

MANIFEST_BODY = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}'
MANIFEST = UpstreamManifest(
    sha256(MANIFEST_BODY), MANIFEST_BODY, "application/vnd.oci.image.manifest.v1+json"
)
TAG_KEY = "docker.io/library/app:1.0"


async def test_concurrent_tag_resolutions_cost_one_upstream_request(tmp_path: Path) -> None:
    upstream = FakeUpstream(manifest_delay=0.05, manifests={"1.0": MANIFEST})
    table = LeaseTable()
    a, advertiser = _node(tmp_path, table, NODE_A, upstream, manifest_window=0.3)
    b, _ = _node(tmp_path, table, NODE_B, upstream, manifest_window=0.3)
    answers = await asyncio.gather(
        *(a.claim_manifest(REGISTRY, REPO, "1.0", TAG_KEY) for _ in range(4)),
        b.claim_manifest(REGISTRY, REPO, "1.0", TAG_KEY),
    )
    assert answers[:4] == [MANIFEST] * 4
    assert answers[4] == HeldElsewhere(NODE_A)
    assert upstream.manifest_calls == ["1.0"]
    assert set(advertiser.advertised) == {TAG_KEY, MANIFEST.digest}
    # Peers' requests by tag or digest are answered from the window.
    assert a.window_manifest(TAG_KEY) == MANIFEST
    assert a.window_manifest(MANIFEST.digest) == MANIFEST
    await a.close()
    await b.close()


async def test_blob_leases_bound_each_holders_waiters_manifest_leases_do_not(
    tmp_path: Path,
) -> None:
    """A blob's lease is asked for with inflight.max_waiters_per_fetch (a holder's uplink
    carries a copy per waiter); a manifest's with no bound (one upstream request per
    reference, whatever the cluster's size). Without a bound (the default) the blob in flight
    is advertised (tests/integration/inflight/test_inflight_serving.py)."""
    upstream = FakeUpstream(manifests={"1.0": MANIFEST})
    digest = upstream.add_blob(BLOB)
    table = LeaseTable()
    node, advertiser = _node(tmp_path, table, NODE_A, upstream, max_waiters_per_fetch=3)
    assert isinstance(await node.claim_blob(REGISTRY, REPO, digest), Fetching)
    assert await node.claim_manifest(REGISTRY, REPO, "1.0", TAG_KEY) == MANIFEST
    assert table.bounds == [(digest, 3), (TAG_KEY, 0), (MANIFEST.digest, 0)]
    # The blob in flight is not advertised: only the lease names its holder, so every node
    # relaying from it is one the lease counted against the bound.
    assert digest not in advertiser.advertised
    assert set(advertiser.advertised) == {TAG_KEY, MANIFEST.digest}
    await node.close()


async def test_tags_are_never_cached_beyond_the_window(tmp_path: Path) -> None:
    upstream = FakeUpstream(manifests={"1.0": MANIFEST})
    table = LeaseTable()
    node, _ = _node(tmp_path, table, NODE_A, upstream, manifest_window=0.05)
    assert await node.claim_manifest(REGISTRY, REPO, "1.0", TAG_KEY) == MANIFEST
    await asyncio.sleep(0.15)  # the 0.05 s window must really close (a TTL: no condition)
    assert node.window_manifest(TAG_KEY) is None
    assert TAG_KEY not in table.held  # released when the window closed
    assert await node.claim_manifest(REGISTRY, REPO, "1.0", TAG_KEY) == MANIFEST
    assert upstream.manifest_calls == ["1.0", "1.0"]
    await node.close()


async def test_a_tags_manifest_is_kept_by_digest_after_the_window(tmp_path: Path) -> None:
    # containerd resolves the tag, then GETs the digest; on a loaded node that can come after
    # the tag's window, and must not cost a second upstream request (seen in the mesh test).
    upstream = FakeUpstream(manifests={"1.0": MANIFEST})
    node, _ = _node(
        tmp_path, LeaseTable(), NODE_A, upstream, manifest_window=0.05, grace_period=5.0
    )
    assert await node.claim_manifest(REGISTRY, REPO, "1.0", TAG_KEY) == MANIFEST
    await asyncio.sleep(0.15)  # the 0.05 s window must really close (a TTL: no condition)
    assert node.window_manifest(TAG_KEY) is None
    assert node.window_manifest(MANIFEST.digest) == MANIFEST
    claim = await node.claim_manifest(REGISTRY, REPO, MANIFEST.digest, MANIFEST.digest)
    assert claim == MANIFEST
    assert upstream.manifest_calls == ["1.0"]
    await node.close()


async def test_manifest_not_matching_its_digest_is_refused(tmp_path: Path) -> None:
    wrong = UpstreamManifest(MANIFEST.digest, MANIFEST_BODY + b" ", MANIFEST.media_type)
    upstream = FakeUpstream(manifests={MANIFEST.digest: wrong})
    node, _ = _node(tmp_path, LeaseTable(), NODE_A, upstream)
    claim = await node.claim_manifest(REGISTRY, REPO, MANIFEST.digest, MANIFEST.digest)
    assert isinstance(claim, Unavailable) and "does not match" in claim.reason
    await node.close()


# --- the waiter's loop -----------------------------------------------------------------------


def _request(method: str = "GET") -> Any:
    return SimpleNamespace(method=method, ctx=SimpleNamespace(), headers={})


def _miss() -> OciError:
    return OciError(ErrorCode.MANIFEST_UNKNOWN, "no image here", status=404)


async def test_waiter_relays_from_the_holder_once_it_is_a_provider(tmp_path: Path) -> None:
    upstream = FakeUpstream(manifests={"1.0": MANIFEST})
    table = LeaseTable()
    a, _ = _node(tmp_path, table, NODE_A, upstream, manifest_window=5)
    b, _ = _node(tmp_path, table, NODE_B, upstream, retry_interval_s=0.01)
    await a.claim_manifest(REGISTRY, REPO, "1.0", TAG_KEY)
    relays = 0
    served = object()

    async def relay() -> Any:
        nonlocal relays
        relays += 1
        if relays < 3:  # the holder's advertisement is not visible yet
            raise _miss()
        return served

    route = parse_v2_path("library/app/manifests/1.0")
    answer = await answer_local_miss(_request(), route, REGISTRY, TAG_KEY, b, _miss(), relay)
    assert answer is served
    assert upstream.manifest_calls == ["1.0"]
    await a.close()
    await b.close()


async def test_waiter_takes_over_when_the_holders_lease_runs_out(tmp_path: Path) -> None:
    upstream = FakeUpstream(manifests={"1.0": MANIFEST})
    table = LeaseTable(ttl=0.1)
    b, _ = _node(tmp_path, table, NODE_B, upstream, retry_interval_s=0.02)
    await table.client(NODE_A).acquire(TAG_KEY)  # A holds the lease, then dies

    async def relay() -> HTTPResponse | None:
        raise _miss()  # A never serves

    route = parse_v2_path("library/app/manifests/1.0")
    answer = await answer_local_miss(_request(), route, REGISTRY, TAG_KEY, b, _miss(), relay)
    assert answer is not None and answer.body == MANIFEST_BODY
    # B took the tag's lease, then the digest's, so peers asking for either are sent to B.
    assert table.granted[-2:] == [(TAG_KEY, NODE_B), (MANIFEST.digest, NODE_B)]
    await b.close()


async def test_waiter_gives_up_with_a_404_after_holder_wait(tmp_path: Path) -> None:
    upstream = FakeUpstream(manifests={"1.0": MANIFEST})
    table = LeaseTable(ttl=60)
    b, _ = _node(tmp_path, table, NODE_B, upstream, holder_wait=0.1, retry_interval_s=0.02)
    await table.client(NODE_A).acquire(TAG_KEY)
    route = parse_v2_path("library/app/manifests/1.0")
    with pytest.raises(OciError) as raised:
        await answer_local_miss(_request(), route, REGISTRY, TAG_KEY, b, _miss(), None)
    assert raised.value.status == 404
    assert "holds the fetch lease" in raised.value.message
    assert upstream.manifest_calls == []
    await b.close()


async def test_stalled_upstream_is_replaced_then_given_up(tmp_path: Path) -> None:
    upstream = FakeUpstream(gate=asyncio.Event())  # never opens: upstream sends nothing
    digest = upstream.add_blob(BLOB)
    table = LeaseTable()
    node, advertiser = _node(
        tmp_path, table, NODE_A, upstream, stall_timeout=0.05, upstream_resumes=1
    )
    claim = await node.claim_blob(REGISTRY, REPO, digest)
    assert isinstance(claim, Fetching)
    await _settled(node)
    await _withdrawn(advertiser, digest)
    assert claim.spool.state.phase is SpoolPhase.FAILED
    assert upstream.blob_calls == [(digest, 0), (digest, 0)]
    # The lease is free for the next asker, and peers stop being sent here.
    assert table.released == [digest] and advertiser.withdrawn == [digest]
    await node.close()


async def test_manifest_window_entries_are_dropped_when_it_closes(tmp_path: Path) -> None:
    upstream = FakeUpstream(manifests={"1.0": MANIFEST})
    node, _ = _node(
        tmp_path, LeaseTable(), NODE_A, upstream, manifest_window=0.05, grace_period=0.05
    )
    await node.claim_manifest(REGISTRY, REPO, "1.0", TAG_KEY)
    await asyncio.sleep(0.15)  # the 0.05 s window must really close (a TTL: no condition)
    assert node.window_size == 0
    await node.close()


async def test_lease_kept_while_the_complete_spool_is_served_then_released(
    tmp_path: Path,
) -> None:
    upstream = FakeUpstream()
    digest = upstream.add_blob(BLOB)
    table = LeaseTable(ttl=0.2)  # shorter than the grace: only renewals keep it
    pool = SpoolPool(tmp_path / "spool", 64 << 20, grace_s=0.5)
    pool.open()
    node = Coordinator(
        InflightSettings(InflightSection(renew_interval=0.05)),
        pool,
        table.client(NODE_A),
        upstream,
        FakeRouter(),
    )
    other = table.client(NODE_B)
    assert await _read_all(node, await node.claim_blob(REGISTRY, REPO, digest)) == BLOB
    await _settled(node)
    # Fixed pauses on purpose: the ttl and the grace period must really elapse.
    await asyncio.sleep(0.3)  # past the ttl, inside the grace period
    assert await other.acquire(digest) == LeaseAnswer(granted=False, holder=NODE_A)
    await asyncio.sleep(0.5)  # the grace period is over: spool gone, lease released
    assert pool.get(digest) is None
    assert table.released == [digest]
    assert (await other.acquire(digest)).granted
    await node.close()
