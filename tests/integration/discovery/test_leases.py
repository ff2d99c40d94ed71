"""Fetch leases across five real discovery nodes on loopback (real gRPC, one process).

Several nodes ask for one key's lease at once: one gets it, all others are named that node.
A holder that stops renewing, releases, or dies frees the lease for the next asker; a node
that does not hold a lease cannot renew or release it; the node deciding on a key dying
hands the decision to the next-closest node.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from services.common.genproto.peermirror.discovery.v1 import local_pb2 as lpb
from services.common.genproto.peermirror.discovery.v1 import local_pb2_grpc as lpb_grpc
from services.common.genproto.peermirror.discovery.v1 import peer_pb2 as pb
from services.common.genproto.peermirror.discovery.v1 import peer_pb2_grpc as pb_grpc
from services.discovery.kademlia import Contact, dht_key, xor_distance
from services.discovery.service import DiscoveryService
from tests.harness.discovery_mesh import FAST_LOOKUPS, Mesh, find_providers
from tests.harness.service_procs import (
    NodePorts,
    cli_argv,
    run_cli,
    running,
    wait_serving,
    write_node_config,
)
from tests.harness.wait import wait_until

pytestmark = pytest.mark.asyncio(loop_scope="module")

NODES = 5
TIMINGS = {**FAST_LOOKUPS, "max_lease_ttl": 30.0}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    built = Mesh(tmp_path_factory.mktemp("lease-mesh"), discovery=dict(TIMINGS))
    try:
        await built.grow(NODES)
        # Every node knows every other before the tests measure who decides.
        await wait_until(
            lambda: all(len(n.engine.node.table) == NODES - 1 for n in built.nodes), within=15.0
        )
        yield built
    finally:
        await built.close()


def _digest(label: str) -> str:
    return "sha256:" + dht_key(label).hex()


def _by_distance(nodes: list[DiscoveryService], name: str) -> list[DiscoveryService]:
    key = dht_key(name)
    return sorted(nodes, key=lambda n: xor_distance(n.engine.node_id, key))


def _key_with(mesh: Mesh, label: str, *, decided_by_not: set[int]) -> str:
    """A digest whose closest node is none of the nodes with the given indexes."""
    banned = {mesh.nodes[i].engine.node_id for i in decided_by_not}
    for attempt in range(1000):
        name = _digest(f"{label}-{attempt}")
        if _by_distance(mesh.live(), name)[0].engine.node_id not in banned:
            return name
    raise AssertionError("no such key")


async def _local(node: DiscoveryService, method: str, request: object) -> object:
    async with grpc.aio.insecure_channel(node.local_address) as channel:
        stub = lpb_grpc.LocalDiscoveryStub(channel)
        return await getattr(stub, method)(request, timeout=10.0)


async def _acquire(node: DiscoveryService, name: str, ttl: int = 0) -> lpb.AcquireLeaseResponse:
    reply = await _local(node, "AcquireLease", lpb.AcquireLeaseRequest(key=name, ttl_seconds=ttl))
    assert isinstance(reply, lpb.AcquireLeaseResponse)
    return reply


async def _acquire_bounded(
    node: DiscoveryService, name: str, max_waiters: int
) -> lpb.AcquireLeaseResponse:
    request = lpb.AcquireLeaseRequest(key=name, max_waiters=max_waiters)
    reply = await _local(node, "AcquireLease", request)
    assert isinstance(reply, lpb.AcquireLeaseResponse)
    return reply


async def _renew(node: DiscoveryService, name: str, ttl: int = 0) -> lpb.RenewLeaseResponse:
    reply = await _local(node, "RenewLease", lpb.RenewLeaseRequest(key=name, ttl_seconds=ttl))
    assert isinstance(reply, lpb.RenewLeaseResponse)
    return reply


async def _release(node: DiscoveryService, name: str) -> bool:
    reply = await _local(node, "ReleaseLease", lpb.ReleaseLeaseRequest(key=name))
    assert isinstance(reply, lpb.ReleaseLeaseResponse)
    return reply.released


async def _status_of(call: asyncio.Future[object] | object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call  # type: ignore[misc]
    return failed.value.code()


async def test_a_bound_on_waiters_gives_the_key_a_holder_per_share_of_askers(mesh: Mesh) -> None:
    """Blob leases asked with max_waiters=1: askers one after another get a lease, its one
    waiter, the next lease, ...; each holder's renewal counts its own waiters only."""
    name = _digest("bounded")
    replies = [await _acquire_bounded(n, name, 1) for n in mesh.nodes]
    assert [r.granted for r in replies] == [True, False, True, False, True]
    ids = [n.engine.node_id for n in mesh.nodes]
    assert replies[1].holder.node_id == ids[0]
    assert replies[3].holder.node_id == ids[2]
    # Asking again is told the same holder, not given a lease.
    again = await _acquire_bounded(mesh.nodes[3], name, 1)
    assert not again.granted and again.holder.node_id == ids[2]
    assert [(await _renew(mesh.nodes[i], name)).waiters for i in (0, 2, 4)] == [1, 1, 0]
    for i in (0, 2, 4):
        assert await _release(mesh.nodes[i], name)


async def test_concurrent_askers_one_granted_all_others_named_the_same_holder(mesh: Mesh) -> None:
    name = _digest("concurrent")
    replies = await asyncio.gather(*(_acquire(n, name) for n in mesh.nodes))
    granted = [i for i, r in enumerate(replies) if r.granted]
    assert len(granted) == 1, replies
    holder = mesh.nodes[granted[0]]
    for i, reply in enumerate(replies):
        if i == granted[0]:
            assert not reply.HasField("holder")
            continue
        assert reply.holder.node_id == holder.engine.node_id
        assert reply.holder.address == "127.0.0.1"
        assert reply.holder.registry_port == holder.cfg.registry.port
        assert 0 < reply.ttl.seconds <= 10
    # Exactly the closest node to the key decided, and it keeps the only record of it.
    decider = _by_distance(mesh.nodes, name)[0]
    assert len(decider.leases.table) >= 1
    assert decider.leases.table.get(dht_key(name), decider.engine.clock()) is not None
    assert all(
        n.leases.table.get(dht_key(name), n.engine.clock()) is None
        for n in mesh.nodes
        if n is not decider
    )

    # Asking again (is the holder still at it?) goes straight to the node that answered.
    waiter = mesh.nodes[(granted[0] + 1) % NODES]
    with _watch_lookups(waiter) as looked_up:
        again = await _acquire(waiter, name)
    assert not again.granted and again.holder.node_id == holder.engine.node_id
    assert dht_key(name) not in looked_up

    # A waiter's FindProviders names the holder first, flagged as fetching, before any
    # provider record exists.
    found = await find_providers(waiter.local_address, name)
    assert [(r.provider.node_id, r.in_flight) for r in found] == [(holder.engine.node_id, True)]
    # The holder takes one place of a caller's limit.
    only = await find_providers(waiter.local_address, name, limit=1)
    assert [(r.provider.node_id, r.in_flight) for r in only] == [(holder.engine.node_id, True)]
    # Every node can see who holds it without taking it.
    lease = await _local(waiter, "GetLease", lpb.GetLeaseRequest(key=name))
    assert isinstance(lease, lpb.GetLeaseResponse)
    assert lease.held and not lease.mine and lease.holder.node_id == holder.engine.node_id
    mine = await _local(holder, "GetLease", lpb.GetLeaseRequest(key=name))
    assert isinstance(mine, lpb.GetLeaseResponse)
    assert mine.held and mine.mine
    stats = await _local(waiter, "Stats", lpb.StatsRequest())
    assert isinstance(stats, lpb.StatsResponse)
    assert stats.lease_waits >= 1
    # The same figures on /metrics.
    assert _metric(decider, "peermirror_leases_granted_total") >= 1
    assert _metric(decider, "peermirror_lease_records") >= 1
    assert _metric(waiter, "peermirror_lease_waiters_total") >= 1
    assert _metric(holder, "peermirror_leases_held") >= 1
    holder_stats = await _local(holder, "Stats", lpb.StatsRequest())
    assert isinstance(holder_stats, lpb.StatsResponse)
    assert holder_stats.leases_held >= 1

    # `peermirror lookup` on the waiter shows the holder as fetching, then its lease.
    code, out, err = await run_cli("lookup", name, "--address", waiter.local_address)
    assert code == 0, err
    first_line, lease_line = out.splitlines()
    assert first_line.endswith(f"node {holder.engine.node_id.hex()}  (fetching from upstream)")
    assert lease_line.startswith(
        f"in flight: fetched from upstream by 127.0.0.1:{holder.cfg.registry.port}  node "
    )
    assert f", {NODES - 1} other node(s) waiting, lease " in lease_line
    code, out, err = await run_cli("lookup", name, "--address", waiter.local_address, "--json")
    assert code == 0, err
    document = json.loads(out)
    assert document["providers"][0]["in_flight"] is True
    assert document["lease"]["node_id"] == holder.engine.node_id.hex()
    # Renewing, the holder learns that every other node waits for its download.
    assert (await _renew(holder, name)).waiters == NODES - 1
    assert await _release(holder, name)
    # Released and nobody holds the content: nothing to show.
    code, out, err = await run_cli("lookup", _digest("nobody"), "--address", waiter.local_address)
    assert (code, out) == (1, "")


async def test_holder_that_stops_renewing_loses_the_lease_to_the_next_asker(mesh: Mesh) -> None:
    name = _digest("stalled")
    holder, other = mesh.nodes[1], mesh.nodes[3]
    assert (await _acquire(holder, name, ttl=6)).granted
    # Renewing keeps it past its first TTL. Fixed pauses on purpose: the 6 s TTL must really
    # elapse (3.5 + 3.5 s) for the renewal to be what kept the lease.
    await asyncio.sleep(3.5)
    assert (await _renew(holder, name, ttl=6)).ttl.seconds >= 5
    await asyncio.sleep(3.5)
    assert not (await _acquire(other, name)).granted
    # Then the holder stalls: past the TTL the next asker gets it.
    await wait_until(lambda: _granted(other, name, ttl=10), within=15.0, interval=0.2)
    reply = await _acquire(mesh.nodes[4], name)
    assert not reply.granted and reply.holder.node_id == other.engine.node_id
    decider = _by_distance(mesh.nodes, name)[0]
    assert decider.leases.table.counters.expired >= 1
    # The old holder renewing now learns it lost the lease.
    lost_before = holder.leases.counters.lost
    code = await _status_of(_renew(holder, name))
    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert holder.leases.counters.lost == lost_before + 1
    assert await _release(other, name)


async def test_release_frees_the_lease_at_once(mesh: Mesh) -> None:
    name = _digest("released")
    first, second = mesh.nodes[2], mesh.nodes[0]
    assert (await _acquire(first, name, ttl=30)).granted
    assert not (await _acquire(second, name)).granted
    assert await _release(first, name)
    assert (await _acquire(second, name, ttl=30)).granted
    # The first holder is just another node now.
    assert await _status_of(_release(first, name)) is grpc.StatusCode.PERMISSION_DENIED
    assert await _release(second, name)
    assert not await _release(second, name)


async def test_only_the_holder_renews_or_releases(mesh: Mesh) -> None:
    name = _digest("not-yours")
    holder, stranger = mesh.nodes[4], mesh.nodes[1]
    assert (await _acquire(holder, name, ttl=30)).granted
    assert await _status_of(_renew(stranger, name)) is grpc.StatusCode.PERMISSION_DENIED
    assert await _status_of(_release(stranger, name)) is grpc.StatusCode.PERMISSION_DENIED
    # Over the Peer port too: the deciding node answers a caller that is not the holder so.
    decider = _by_distance(mesh.nodes, name)[0]
    caller = stranger if decider is not stranger else holder
    async with grpc.aio.insecure_channel(decider.peer_address) as channel:
        stub = pb_grpc.PeerStub(channel)
        request = pb.PeerLeaseKey(sender=caller.engine.sender_info(), key=dht_key(name))
        if caller is stranger:
            code = await _status_of(stub.ReleaseLease(request, timeout=5.0))
            assert code is grpc.StatusCode.PERMISSION_DENIED
        bad = pb.PeerLeaseRequest(sender=caller.engine.sender_info(), key=b"short")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.AcquireLease(bad, timeout=5.0)
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert (refused.value.details() or "").startswith("key:")
    # Still the holder's; a renewal goes straight to the deciding node, no lookup.
    with _watch_lookups(holder) as looked_up:
        assert (await _renew(holder, name)).ttl.seconds > 0
    assert dht_key(name) not in looked_up
    # Nobody holds an unknown key.
    unknown = _digest("never-leased")
    assert await _status_of(_renew(stranger, unknown)) is grpc.StatusCode.NOT_FOUND
    assert await _release(holder, name)


async def test_bad_requests_name_the_field(mesh: Mesh) -> None:
    node = mesh.nodes[0]
    for request, field in (
        (lpb.AcquireLeaseRequest(key=""), "key"),
        (lpb.AcquireLeaseRequest(key="sha256:a b"), "key"),
        (lpb.AcquireLeaseRequest(key="x" * 5000), "key"),
        (lpb.AcquireLeaseRequest(key=_digest("ttl"), ttl_seconds=31), "ttl_seconds"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _local(node, "AcquireLease", request)
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert (refused.value.details() or "").startswith(f"{field}:")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _local(node, "RenewLease", lpb.RenewLeaseRequest(key="", ttl_seconds=1))
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_deciding_node_dying_hands_over_to_the_next_closest(mesh: Mesh) -> None:
    # Runs last but one: it kills a node. Holder and waiter are never the deciding node.
    name = _key_with(mesh, "handover", decided_by_not={0, 1, 2})
    decider, next_closest = _by_distance(mesh.live(), name)[:2]
    holder, waiter = mesh.nodes[1], mesh.nodes[2]
    assert (await _acquire(holder, name, ttl=10)).granted
    await mesh.kill(mesh.nodes.index(decider))
    # The holder's renewal fails over to the next-closest node, which grants it again.
    assert (await _renew(holder, name, ttl=10)).ttl.seconds > 0
    assert next_closest.leases.table.get(dht_key(name), next_closest.engine.clock()) is not None
    assert holder.leases.counters.failovers >= 1
    reply = await _acquire(waiter, name)
    assert not reply.granted and reply.holder.node_id == holder.engine.node_id
    assert await _release(holder, name)


async def test_holder_killed_frees_the_lease_after_its_ttl(mesh: Mesh) -> None:
    name = _key_with(mesh, "holder-dies", decided_by_not={0, 3})
    victim = next(n for n in _by_distance(mesh.live(), name)[1:] if n is not mesh.nodes[0])
    assert (await _acquire(victim, name, ttl=5)).granted
    await mesh.kill(mesh.nodes.index(victim))
    asker = mesh.nodes[0]
    first = await _acquire(asker, name)
    assert not first.granted and first.holder.node_id == victim.engine.node_id
    await wait_until(lambda: _granted(asker, name), within=15.0, interval=0.2)


async def _granted(node: DiscoveryService, name: str, ttl: int = 0) -> bool:
    return (await _acquire(node, name, ttl)).granted


def _metric(node: DiscoveryService, name: str) -> float:
    """An unlabelled sample of the node's discovery metrics, as a scrape shows it."""
    for line in node.metrics.render().decode().splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


async def test_holder_process_killed_frees_the_lease_after_its_ttl(tmp_path: Path) -> None:
    # A real `peermirror discovery` process holds the lease and is SIGKILLed mid-fetch.
    mesh = Mesh(tmp_path / "mesh", discovery=dict(TIMINGS))
    try:
        await mesh.grow(3)
        ports = NodePorts.pick()
        config = write_node_config(
            tmp_path / "proc", ports, bootstrap_peers=[mesh.bootstrap], **TIMINGS
        )
        local = ports.grpc_address("discovery")
        with running(cli_argv("discovery", "--config", str(config)), tmp_path, "holder") as proc:
            await asyncio.to_thread(wait_serving, local, proc)
            async with grpc.aio.insecure_channel(local) as channel:
                stub = lpb_grpc.LocalDiscoveryStub(channel)
                stats = await stub.Stats(lpb.StatsRequest(), timeout=5.0)
                holder_id = stats.node_id
                await wait_until(
                    lambda: all(holder_id in n.engine.node.table for n in mesh.nodes), within=10.0
                )
                # A key the process does not decide on itself: its death must not take the
                # lease record with it.
                ids = [holder_id, *(m.engine.node_id for m in mesh.nodes)]
                name = next(
                    n
                    for n in (_digest(f"process-{i}") for i in range(1000))
                    if _closest(ids, n) != holder_id
                )
                granted = await stub.AcquireLease(
                    lpb.AcquireLeaseRequest(key=name, ttl_seconds=6), timeout=10.0
                )
                assert granted.granted
            waiting = await asyncio.gather(*(_acquire(n, name) for n in mesh.nodes))
            assert all(not r.granted and r.holder.node_id == holder_id for r in waiting)
            proc.kill()
            # Nobody renews now: past the TTL exactly one asker takes it over.
            await wait_until(lambda: _granted(mesh.nodes[1], name), within=15.0, interval=0.2)
            after = await asyncio.gather(*(_acquire(n, name) for n in mesh.nodes))
            assert [r.granted for r in after] == [False, True, False]
            assert after[0].holder.node_id == mesh.nodes[1].engine.node_id
    finally:
        await mesh.close()


def _closest(ids: list[bytes], name: str) -> bytes:
    key = dht_key(name)
    return min(ids, key=lambda node_id: xor_distance(node_id, key))


@contextlib.contextmanager
def _watch_lookups(node: DiscoveryService) -> Iterator[list[bytes]]:
    """The node lookups `node` runs meanwhile (targets), its own behaviour unchanged."""
    engine = node.engine
    looked_up: list[bytes] = []
    lookup_nodes = engine.lookup_nodes

    async def watched(target: bytes) -> list[Contact]:
        looked_up.append(target)
        return await lookup_nodes(target)

    engine.lookup_nodes = watched  # type: ignore[method-assign]
    try:
        yield looked_up
    finally:
        del engine.lookup_nodes
