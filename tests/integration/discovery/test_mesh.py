"""Twenty discovery nodes on loopback, one process, real gRPC: the DHT doing its job end to end.

Every node is a full DiscoveryService with its own Peer and LocalDiscovery servers, and all
but the first join through the first one's address only. Short liveness timings (probe
every 1 s, window 3 s) keep the dead-node test quick; it prints the measured figure.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.genproto.peermirror.discovery.v1 import local_pb2 as lpb
from services.common.genproto.peermirror.discovery.v1 import local_pb2_grpc as lpb_grpc
from services.common.genproto.peermirror.discovery.v1 import peer_pb2 as pb
from services.common.genproto.peermirror.discovery.v1 import peer_pb2_grpc as pb_grpc
from services.discovery.kademlia import dht_key
from services.discovery.service import DiscoveryService
from tests.harness.discovery_mesh import (
    FAST_LOOKUPS,
    REGISTRY_PORT_BASE,
    Mesh,
    find_providers,
    wait_until,
)
from tests.harness.service_procs import run_cli

pytestmark = pytest.mark.asyncio(loop_scope="module")

NODES = 20
TIMINGS = FAST_LOOKUPS
# Beyond window + cache TTL: scheduling on a busy two-core machine and the polling itself.
SLACK = 3.0


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    built = Mesh(tmp_path_factory.mktemp("mesh"), discovery=dict(TIMINGS))
    try:
        await built.grow(NODES)
        yield built
    finally:
        await built.close()


def _digest(label: str) -> str:
    return "sha256:" + dht_key(label).hex()


async def _advertise(address: str, *keys: str) -> lpb.AdvertiseResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        reply: lpb.AdvertiseResponse = await lpb_grpc.LocalDiscoveryStub(channel).Advertise(
            lpb.AdvertiseRequest(keys=list(keys)), timeout=5.0
        )
        return reply


async def _providers_everywhere(mesh: Mesh, key: str, skip: int) -> list[set[bytes]]:
    answers = await asyncio.gather(
        *(find_providers(n.local_address, key) for i, n in enumerate(mesh.nodes) if i != skip)
    )
    return [{r.provider.node_id for r in answer} for answer in answers]


async def test_mesh_forms_from_one_bootstrap_address(mesh: Mesh) -> None:
    assert all(n.cfg.discovery.bootstrap_peers == [mesh.bootstrap] for n in mesh.nodes[1:]), (
        "every node but the first joins through the first one's address only"
    )
    ids = {n.engine.node_id for n in mesh.nodes}
    assert len(ids) == NODES
    known_by: dict[bytes, int] = dict.fromkeys(ids, 0)
    sizes = []
    for node in mesh.nodes:
        async with grpc.aio.insecure_channel(node.local_address) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5.0
            )
            peers = await lpb_grpc.LocalDiscoveryStub(channel).ListPeers(
                lpb.ListPeersRequest(), timeout=5.0
            )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        listed = {p.contact.node_id for p in peers.peers}
        assert listed <= ids - {node.engine.node_id}
        assert all(p.contact.address == "127.0.0.1" for p in peers.peers)
        sizes.append(len(listed))
        for node_id in listed:
            known_by[node_id] += 1
    print(f"\nrouting table sizes on the {NODES}-node mesh: min {min(sizes)} max {max(sizes)}")
    assert min(sizes) >= NODES // 2
    assert min(known_by.values()) >= 1


async def test_key_advertised_on_one_node_is_found_from_every_other(mesh: Mesh) -> None:
    advertiser = mesh.nodes[5]
    key = _digest("found-everywhere")
    reply = await _advertise(advertiser.local_address, key, key)
    assert (reply.added, reply.total) == (1, 1)

    async def everywhere() -> bool:
        found = await _providers_everywhere(mesh, key, skip=5)
        return all(advertiser.engine.node_id in f for f in found)

    await wait_until(everywhere, within=15.0)
    answers = await find_providers(mesh.nodes[17].local_address, key)
    provider = next(r.provider for r in answers if r.provider.node_id == advertiser.engine.node_id)
    assert provider.address == "127.0.0.1"
    assert provider.registry_port == REGISTRY_PORT_BASE + 5
    assert provider.discovery_port == advertiser.peer_server.port
    # A node never names itself as a provider.
    assert await find_providers(advertiser.local_address, key) == []


async def test_concurrent_lookups_of_one_key_share_one_network_lookup(mesh: Mesh) -> None:
    key = _digest("single-flight")
    await _advertise(mesh.nodes[8].local_address, key)
    await wait_until(lambda: len(mesh.nodes[3].engine.node.store) > 0, within=10.0)
    asker = mesh.nodes[3].engine
    await wait_until(lambda: asker.node.store.get(dht_key(key), asker.clock()), within=10.0)
    before = (asker.counters.network_lookups, asker.counters.lookup_cache_hits)

    async def collect() -> list[bytes]:
        return [p.node_id async for p in asker.find_providers(key)]

    answers = await asyncio.gather(*(collect() for _ in range(10)))
    assert all(a == [mesh.nodes[8].engine.node_id] for a in answers)
    assert asker.counters.network_lookups - before[0] == 1
    assert asker.counters.lookup_cache_hits - before[1] == 9
    # Right after, the finished lookup answers from the cache: no new network lookup.
    assert await collect() == [mesh.nodes[8].engine.node_id]
    assert asker.counters.network_lookups - before[0] == 1


async def test_withdrawn_key_is_removed_from_the_nodes_holding_it(mesh: Mesh) -> None:
    owner = mesh.nodes[6]
    key = _digest("withdrawn")
    await _advertise(owner.local_address, key)

    def holders() -> list[DiscoveryService]:
        return [n for n in mesh.nodes if n.engine.node.store.get(dht_key(key), n.engine.clock())]

    await wait_until(lambda: len(holders()) >= NODES // 2, within=10.0)
    async with grpc.aio.insecure_channel(owner.local_address) as channel:
        reply = await lpb_grpc.LocalDiscoveryStub(channel).Withdraw(
            lpb.WithdrawRequest(keys=[key, _digest("never-advertised")]), timeout=5.0
        )
    assert (reply.removed, reply.total) == (1, 0)
    # Records live 600 s: their going within seconds is RemoveProvider's doing.
    await wait_until(lambda: holders() == [], within=10.0)

    async def nowhere() -> bool:
        return all(not f for f in await _providers_everywhere(mesh, key, skip=6))

    await wait_until(nowhere, within=TIMINGS["lookup_cache_ttl"] + 5.0)


async def _expect_invalid(call: Awaitable[object], field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith(f"{field}:"), info.value.details()


async def test_malformed_requests_are_invalid_argument_naming_the_field(mesh: Mesh) -> None:
    target = mesh.nodes[2]
    peers_before = len(target.engine.node.table)
    ok_id = b"\x42" * 32
    good = pb.SenderInfo(node_id=ok_id, discovery_port=1, registry_port=1)
    async with grpc.aio.insecure_channel(target.peer_address) as channel:
        peer = pb_grpc.PeerStub(channel)
        short = pb.SenderInfo(node_id=b"\x01" * 31, discovery_port=5001, registry_port=6443)
        await _expect_invalid(peer.Ping(pb.PingRequest(sender=short)), "sender.node_id")
        await _expect_invalid(peer.Ping(pb.PingRequest()), "sender")
        no_port = pb.SenderInfo(node_id=ok_id, discovery_port=0, registry_port=6443)
        await _expect_invalid(peer.Ping(pb.PingRequest(sender=no_port)), "sender.discovery_port")
        await _expect_invalid(peer.FindNode(pb.FindNodeRequest(sender=good, target=b"x")), "target")
        await _expect_invalid(
            peer.GetProviders(pb.GetProvidersRequest(sender=good, key=b"x" * 33)), "key"
        )
        await _expect_invalid(
            peer.AddProvider(pb.AddProviderRequest(sender=good, keys=[ok_id, b"short"])),
            "keys[1]",
        )
        await _expect_invalid(
            peer.AddProvider(pb.AddProviderRequest(sender=good, keys=[ok_id] * 1025)), "keys"
        )
        await _expect_invalid(
            peer.RemoveProvider(pb.RemoveProviderRequest(sender=good, keys=[])), "keys"
        )
        # The node-local API is not served on the peer port.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await lpb_grpc.LocalDiscoveryStub(channel).Stats(lpb.StatsRequest(), timeout=5.0)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    async with grpc.aio.insecure_channel(target.local_address) as channel:
        local = lpb_grpc.LocalDiscoveryStub(channel)
        await _expect_invalid(local.Advertise(lpb.AdvertiseRequest(keys=["ok", ""])), "keys[1]")
        await _expect_invalid(local.Withdraw(lpb.WithdrawRequest(keys=["a b"])), "keys[0]")
        stream = local.FindProviders(lpb.FindProvidersRequest(key=""))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            _ = [r async for r in stream]
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (info.value.details() or "").startswith("key:")
    # Rejected callers were not taken into the routing table.
    assert ok_id not in target.engine.node.table
    assert len(target.engine.node.table) == peers_before


async def test_cli_peers_and_lookup_against_a_running_node(mesh: Mesh, tmp_path: Path) -> None:
    import json

    node = mesh.nodes[4]
    key = _digest("cli-lookup")
    await _advertise(mesh.nodes[9].local_address, key)
    await wait_until(
        lambda: node.engine.node.store.get(dht_key(key), node.engine.clock()), within=10.0
    )
    config = tmp_path / "node.yaml"
    config.write_text(f"discovery:\n  local_address: '{node.local_address}'\n")

    code, out, err = await run_cli("peers", "--config", str(config), "--json")
    assert code == 0, err
    listed = json.loads(out)
    assert listed["node_id"] == node.engine.node_id.hex()
    assert len(listed["peers"]) == len(node.engine.node.table)

    code, out, err = await run_cli("peers", "--address", node.local_address)
    assert code == 0, err
    assert f"node {node.engine.node_id.hex()}" in out

    code, out, err = await run_cli("lookup", key, "--address", node.local_address)
    assert code == 0, err
    assert out.split() == [
        f"127.0.0.1:{REGISTRY_PORT_BASE + 9}",
        "node",
        mesh.nodes[9].engine.node_id.hex(),
    ]

    code, out, err = await run_cli(
        "lookup", _digest("nobody-has-this"), "--address", node.local_address
    )
    assert (code, out) == (1, "")
    assert "no provider found" in err


async def test_killed_advertiser_stops_being_returned_within_the_liveness_window(
    mesh: Mesh,
) -> None:
    victim_index = 11
    victim = mesh.nodes[victim_index]
    victim_id = victim.engine.node_id
    key = _digest("dies")
    await _advertise(victim.local_address, key)

    async def everywhere() -> bool:
        found = await _providers_everywhere(mesh, key, skip=victim_index)
        return all(victim_id in f for f in found)

    await wait_until(everywhere, within=15.0)
    killed_at = time.monotonic()
    await mesh.kill(victim_index)

    def forgotten() -> bool:
        # Every live node dropped the victim's records and its routing-table entry.
        return all(
            victim_id not in n.engine.node.table
            and n.engine.node.store.last_seen(victim_id) is None
            for n in mesh.live()
        )

    async def gone() -> bool:
        answers = await _providers_everywhere(mesh, key, skip=victim_index)
        return all(victim_id not in f for f in answers)

    window = TIMINGS["liveness_window"]
    await wait_until(forgotten, within=30.0, interval=0.02)
    dropped_after = time.monotonic() - killed_at
    # Timed from the start of the first round of lookups (one per live node) that no
    # longer names it: under load a round itself takes a while.
    round_started = killed_at

    async def round_gone() -> bool:
        nonlocal round_started
        round_started = time.monotonic()
        return await gone()

    await wait_until(
        round_gone,
        within=max(0.0, killed_at + 30.0 - time.monotonic()),
        what="lookups no longer naming the dead node",
    )
    unanswered_after = round_started - killed_at
    print(
        f"\ndead advertiser dropped by all {NODES - 1} live nodes after {dropped_after:.2f} s; "
        f"gone from every lookup after {unanswered_after:.2f} s (probe interval "
        f"{TIMINGS['probe_interval']:g} s, liveness window {window:g} s, lookup cache "
        f"{TIMINGS['lookup_cache_ttl']:g} s)"
    )
    assert dropped_after < window + SLACK
    assert unanswered_after < window + TIMINGS["lookup_cache_ttl"] + SLACK
