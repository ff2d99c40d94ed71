"""The discovery peer port over mutual TLS, and a node's DHT identity bound to its certificate."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from services.common.genproto.peermirror.discovery.v1 import peer_pb2 as pb
from services.common.genproto.peermirror.discovery.v1 import peer_pb2_grpc as pb_grpc
from services.discovery.kademlia.node_id import dht_key, xor_distance
from services.discovery.service import DiscoveryService
from tests.harness.discovery_mesh import find_providers
from tests.harness.wait import wait_until
from tests.integration.security.conftest import ClusterPki
from tests.integration.security.nodes import (
    credentials_of,
    discovery_config,
    discovery_node,
    node_id_of,
    peer_stub,
    sender,
)
from tests.integration.security.rogue_peer import RoguePeer

KEY = "sha256:" + "ab" * 32
RPC_TIMEOUT = 5.0


@pytest.fixture
async def node(cluster: ClusterPki, tmp_path: Path) -> AsyncIterator[DiscoveryService]:
    async with discovery_node(discovery_config(tmp_path / "node-a", cluster.node)) as service:
        yield service


@pytest.fixture
async def pair(
    cluster: ClusterPki, tmp_path: Path
) -> AsyncIterator[tuple[DiscoveryService, DiscoveryService]]:
    """Two honest nodes over mutual TLS, b bootstrapped from a (registry ports 7001 and 7002)."""
    cfg_a = discovery_config(tmp_path / "a", cluster.node, registry_port=7001)
    async with discovery_node(cfg_a) as a:
        cfg_b = discovery_config(
            tmp_path / "b", cluster.peer, registry_port=7002, bootstrap=[a.peer_address]
        )
        async with discovery_node(cfg_b) as b:
            yield a, b


def _records(service: DiscoveryService, key: str) -> list[tuple[bytes, str, int]]:
    engine = service.engine
    return [
        (r.provider.node_id, r.provider.address, r.provider.registry_port)
        for r in engine.node.store.get(dht_key(key), engine.clock())
    ]


async def test_a_node_certificate_of_the_cluster_ca_is_answered(
    node: DiscoveryService, cluster: ClusterPki
) -> None:
    caller = node_id_of(cluster.peer)
    async with peer_stub(node.peer_address, credentials_of(cluster.peer)) as stub:
        reply = await stub.Ping(pb.PingRequest(sender=sender(caller)), timeout=RPC_TIMEOUT)
        assert reply.responder.node_id == node.engine.node_id
        assert reply.observed_address == "127.0.0.1"
        added = await stub.AddProvider(
            pb.AddProviderRequest(sender=sender(caller, registry_port=7443), keys=[dht_key(KEY)]),
            timeout=RPC_TIMEOUT,
        )
    assert added.stored == 1
    # The record carries the address the certificate and the connection agree on.
    assert _records(node, KEY) == [(caller, "127.0.0.1", 7443)]


@pytest.mark.parametrize("which", ["plaintext", "no certificate", "foreign", "expired"])
async def test_callers_without_a_valid_certificate_are_refused(
    node: DiscoveryService, cluster: ClusterPki, which: str
) -> None:
    if which == "plaintext":
        credentials = None
    elif which == "no certificate":
        credentials = grpc.ssl_channel_credentials(root_certificates=cluster.node.read()[0])
    else:
        credentials = credentials_of(getattr(cluster, which))
    async with peer_stub(node.peer_address, credentials) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.AddProvider(
                pb.AddProviderRequest(sender=sender(os.urandom(32)), keys=[dht_key(KEY)]),
                timeout=RPC_TIMEOUT,
            )
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    assert _records(node, KEY) == []
    assert len(node.engine.node.table) == 0


async def test_a_certificate_naming_another_address_cannot_place_records(
    node: DiscoveryService, cluster: ClusterPki
) -> None:
    # Signed by the cluster CA, but for 127.0.0.3: calling from 127.0.0.1 it would place
    # records (and a routing contact) under an address that is not its own.
    rogue = os.urandom(32)
    async with peer_stub(node.peer_address, credentials_of(cluster.rogue)) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.AddProvider(
                pb.AddProviderRequest(sender=sender(rogue), keys=[dht_key(KEY)]),
                timeout=RPC_TIMEOUT,
            )
        assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "127.0.0.3" in (err.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as ping_err:
            await stub.Ping(pb.PingRequest(sender=sender(rogue)), timeout=RPC_TIMEOUT)
        assert ping_err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert _records(node, KEY) == []
    assert rogue not in node.engine.node.table


async def test_two_nodes_find_each_others_content_over_mutual_tls(
    pair: tuple[DiscoveryService, DiscoveryService],
) -> None:
    a, b = pair
    assert b.engine.node_id in a.engine.node.table
    b.engine.advertise([KEY])
    found: list[tuple[bytes, str, int]] = []

    async def found_b() -> bool:
        found[:] = [
            (c.node_id, c.address, c.registry_port) async for c in a.engine.find_providers(KEY)
        ]
        # A lookup cached before b advertised would keep answering "nobody".
        a.engine.cache.drop_node(b.engine.node_id)
        return bool(found)

    await wait_until(found_b, within=5.0)
    assert found == [(b.engine.node_id, "127.0.0.1", 7002)]


async def test_a_certificate_naming_another_address_cannot_take_a_lease(
    node: DiscoveryService, cluster: ClusterPki
) -> None:
    async with peer_stub(node.peer_address, credentials_of(cluster.rogue)) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.AcquireLease(
                pb.PeerLeaseRequest(sender=sender(os.urandom(32)), key=dht_key(KEY)),
                timeout=RPC_TIMEOUT,
            )
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert len(node.leases.table) == 0


async def test_two_nodes_share_one_fetch_lease_over_mutual_tls(
    pair: tuple[DiscoveryService, DiscoveryService],
) -> None:
    a, b = pair
    assert a.engine.node_id in b.engine.node.table
    taken = await b.leases.acquire(KEY, 0)
    assert taken.granted
    told = await a.leases.acquire(KEY, 0)
    assert not told.granted and told.holder is not None
    assert (told.holder.node_id, told.holder.address, told.holder.registry_port) == (
        b.engine.node_id,
        "127.0.0.1",
        7002,
    )
    assert await b.leases.release(KEY)
    assert (await a.leases.acquire(KEY, 0)).granted


async def test_a_closer_node_without_leases_is_skipped(cluster: ClusterPki, tmp_path: Path) -> None:
    # The rogue peer stands in for a node of an older version: lease RPCs are UNIMPLEMENTED.
    async with RoguePeer(cluster.peer) as older:
        cfg = discovery_config(tmp_path / "a", cluster.node, bootstrap=[older.address])
        async with discovery_node(cfg) as node:
            assert older.node_id in node.engine.node.table
            name = next(
                n
                for n in (f"sha256:{i:064x}" for i in range(1000))
                if xor_distance(older.node_id, dht_key(n))
                < xor_distance(node.engine.node_id, dht_key(n))
            )
            view = await node.leases.acquire(name, 0)
            assert view.granted
            assert node.leases.counters.failovers == 1
            assert node.leases.table.get(dht_key(name), node.engine.clock()) is not None


def _table(service: DiscoveryService) -> list[tuple[bytes, str, int, int]]:
    return [
        (c.node_id, c.address, c.discovery_port, c.registry_port) for c in service.engine.node.table
    ]


def _denied(err: grpc.aio.AioRpcError, field: str) -> None:
    assert err.code() is grpc.StatusCode.PERMISSION_DENIED
    assert (err.details() or "").startswith(f"{field}:")


async def test_the_node_id_is_derived_from_the_certificate(
    node: DiscoveryService, cluster: ClusterPki
) -> None:
    assert node.engine.node_id == node_id_of(cluster.node)
    # The same key always gives the same ID (a restart keeps it), another key another ID.
    assert node_id_of(cluster.node) == node_id_of(cluster.node)
    assert len({node_id_of(cluster.node), node_id_of(cluster.peer), node_id_of(cluster.other)}) == 3


async def test_a_node_claiming_another_nodes_id_is_refused_and_changes_nothing(
    node: DiscoveryService, cluster: ClusterPki
) -> None:
    victim = node_id_of(cluster.peer)
    async with peer_stub(node.peer_address, credentials_of(cluster.peer)) as stub:
        await stub.AddProvider(
            pb.AddProviderRequest(sender=sender(victim, registry_port=7443), keys=[dht_key(KEY)]),
            timeout=RPC_TIMEOUT,
        )
    records, table = _records(node, KEY), _table(node)
    assert records == [(victim, "127.0.0.1", 7443)]
    # Another authenticated node (same address: both call from loopback) claims the victim's ID
    # to overwrite its record with its own registry port, or to withdraw it.
    attempts: list[Callable[[pb_grpc.PeerAsyncStub], Awaitable[object]]] = [
        lambda stub: stub.Ping(
            pb.PingRequest(sender=sender(victim, registry_port=9999)), timeout=RPC_TIMEOUT
        ),
        lambda stub: stub.AddProvider(
            pb.AddProviderRequest(sender=sender(victim, registry_port=9999), keys=[dht_key(KEY)]),
            timeout=RPC_TIMEOUT,
        ),
        lambda stub: stub.RemoveProvider(
            pb.RemoveProviderRequest(sender=sender(victim), keys=[dht_key(KEY)]),
            timeout=RPC_TIMEOUT,
        ),
        lambda stub: stub.FindNode(
            pb.FindNodeRequest(sender=sender(victim, discovery_port=9), target=victim),
            timeout=RPC_TIMEOUT,
        ),
    ]
    async with peer_stub(node.peer_address, credentials_of(cluster.other)) as stub:
        for attempt in attempts:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await attempt(stub)
            _denied(err.value, "sender.node_id")
    assert _records(node, KEY) == records
    assert _table(node) == table


async def test_a_node_minting_many_ids_is_refused_and_changes_nothing(
    node: DiscoveryService, cluster: ClusterPki
) -> None:
    # A Sybil attack: one certificate, many IDs, to fill the k closest slots of chosen keys.
    async with peer_stub(node.peer_address, credentials_of(cluster.other)) as stub:
        for _ in range(40):
            minted = os.urandom(32)
            for call in (
                stub.Ping(pb.PingRequest(sender=sender(minted)), timeout=RPC_TIMEOUT),
                stub.AddProvider(
                    pb.AddProviderRequest(sender=sender(minted), keys=[dht_key(KEY)]),
                    timeout=RPC_TIMEOUT,
                ),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                _denied(err.value, "sender.node_id")
        # Its own ID is answered.
        own = node_id_of(cluster.other)
        await stub.Ping(pb.PingRequest(sender=sender(own)), timeout=RPC_TIMEOUT)
    assert _records(node, KEY) == []
    assert [c[0] for c in _table(node)] == [own]


async def test_a_flood_from_one_peer_keeps_memory_bounded_and_others_keys_resolvable(
    cluster: ClusterPki, tmp_path: Path
) -> None:
    cfg = discovery_config(
        tmp_path / "a",
        cluster.node,
        max_records_per_peer=3000,
        max_records_total=6000,
        peer_records_per_second=2000.0,
    )
    honest_id, flooder_id = node_id_of(cluster.peer), node_id_of(cluster.other)
    late = "sha256:" + "cd" * 32
    async with discovery_node(cfg) as a:
        async with peer_stub(a.peer_address, credentials_of(cluster.peer)) as honest:
            await honest.AddProvider(
                pb.AddProviderRequest(
                    sender=sender(honest_id, registry_port=7002), keys=[dht_key(KEY)]
                ),
                timeout=RPC_TIMEOUT,
            )
        stored = refused = 0
        async with peer_stub(a.peer_address, credentials_of(cluster.other)) as flooder:
            for _ in range(60):
                request = pb.AddProviderRequest(
                    sender=sender(flooder_id), keys=[os.urandom(32) for _ in range(1024)]
                )
                try:
                    stored += (await flooder.AddProvider(request, timeout=RPC_TIMEOUT)).stored
                except grpc.aio.AioRpcError as err:
                    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert "discovery.peer_records_per_second" in (err.details() or "")
                    refused += 1
        store = a.engine.node.store
        assert stored <= 3000
        assert refused > 0
        assert len(store) <= 3001
        assert store.pending_expiries() <= 2 * len(store) + 64
        # The honest node's key is still found, and it can still publish.
        async with peer_stub(a.peer_address, credentials_of(cluster.peer)) as honest:
            reply = await honest.AddProvider(
                pb.AddProviderRequest(
                    sender=sender(honest_id, registry_port=7002), keys=[dht_key(late)]
                ),
                timeout=RPC_TIMEOUT,
            )
        assert reply.stored == 1
        for key in (KEY, late):
            found = await find_providers(a.local_address, key)
            assert [(r.provider.node_id, r.provider.registry_port) for r in found] == [
                (honest_id, 7002)
            ]
