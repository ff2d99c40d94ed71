"""No open proxy: the registry dials only authenticated peers on their registry port.

A rogue but authenticated node poisons provider lists with an address where a listener counts
connections; a client names that address as `ns`; a peer answers with a redirect to it. The
listener must never see a connection from the registry.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from services.common.genproto.peermirror.discovery.v1 import peer_pb2 as pb
from services.common.store.oci_layout import OciLayoutStore
from services.common.tls import server_context
from services.discovery.kademlia import AddStatus, Contact, common_prefix_length, dht_key
from services.discovery.kademlia.node_id import id_int, int_id
from services.discovery.service import DiscoveryService
from tests.harness.discovery_mesh import find_providers
from tests.harness.fake_discovery import FakeDiscovery
from tests.harness.registry_inproc import RunningRegistry, serve_registry
from tests.harness.wait import wait_until
from tests.integration.security.conftest import OTHER_IP, ClusterPki, ConnectionRecorder
from tests.integration.security.nodes import discovery_config, discovery_node
from tests.integration.security.rogue_peer import RoguePeer
from tests.unit.discovery.helpers import with_prefix

DIGEST = "sha256:" + hashlib.sha256(b"content nobody here has").hexdigest()
TIMEOUT = aiohttp.ClientTimeout(total=20)
SETTLE_S = 10.0


def _poison(recorder: ConnectionRecorder, discovery_port: int) -> pb.Contact:
    """A provider at the recorder's address: registry port = the recorder, discovery port =
    where the honest node may try to verify it (another listener)."""
    return pb.Contact(
        node_id=os.urandom(32),
        address=OTHER_IP,
        discovery_port=discovery_port,
        registry_port=recorder.port,
    )


async def _get(registry: RunningRegistry, cluster: ClusterPki, path: str, ns: str) -> int:
    connector = aiohttp.TCPConnector(ssl=cluster.context("peer"), force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=TIMEOUT, trust_env=False) as session,
        session.get(f"{registry.url}{path}", params={"ns": ns}) as resp,
    ):
        await resp.read()
        return resp.status


@pytest.fixture
async def rogue(cluster: ClusterPki) -> AsyncIterator[RoguePeer]:
    """An authenticated node (certificate of the cluster CA) that lies about providers."""
    async with RoguePeer(cluster.other) as peer:
        yield peer


@pytest.fixture
async def honest(
    cluster: ClusterPki, rogue: RoguePeer, tmp_path: Path
) -> AsyncIterator[DiscoveryService]:
    """Node A, joined through the rogue peer (so the rogue is in its routing table)."""
    cfg = discovery_config(tmp_path / "a", cluster.node, bootstrap=[rogue.address])
    async with discovery_node(cfg) as node:
        assert rogue.node_id in node.engine.node.table
        yield node


@pytest.fixture
async def verify_port() -> AsyncIterator[ConnectionRecorder]:
    """A listener on OTHER_IP, where a poisoned contact says its discovery port is: dialling it
    to verify the contact is allowed, unlike dialling the registry port it names."""
    async with ConnectionRecorder(host=OTHER_IP) as listener:
        yield listener


async def test_providers_named_by_a_peer_must_prove_their_address(
    honest: DiscoveryService,
    rogue: RoguePeer,
    cluster: ClusterPki,
    recorder: ConnectionRecorder,
    verify_port: ConnectionRecorder,
    tmp_path: Path,
) -> None:
    # A real node the honest one has never heard of: it proves its address over mTLS.
    cfg_b = discovery_config(tmp_path / "b", cluster.peer, registry_port=7002)
    async with discovery_node(cfg_b) as b:
        real = pb.Contact(
            node_id=b.engine.node_id,
            address="127.0.0.1",
            discovery_port=b.engine.discovery_port,
            registry_port=7002,
        )
        rogue.poison = [_poison(recorder, verify_port.port), real]
        found = await find_providers(honest.local_address, DIGEST)
    assert [(r.provider.node_id, r.provider.registry_port) for r in found] == [
        (b.engine.node_id, 7002)
    ]
    assert honest.engine.counters.providers_refused == 1
    assert recorder.connections == 0


async def test_poisoned_provider_lists_and_ns_are_never_dialled(
    honest: DiscoveryService,
    rogue: RoguePeer,
    cluster: ClusterPki,
    recorder: ConnectionRecorder,
    verify_port: ConnectionRecorder,
    tmp_path: Path,
) -> None:
    rogue.poison = [_poison(recorder, verify_port.port)]
    store = OciLayoutStore(tmp_path / "layout", create=True)
    try:
        async with serve_registry(
            store, tmp_path, discovery=honest.local_address, tls=cluster.node
        ) as registry:
            path = f"/v2/library/app/blobs/{DIGEST}"
            assert await _get(registry, cluster, path, "docker.io") == 404
            # `ns` is only ever a query parameter to peers, never an address to dial.
            assert await _get(registry, cluster, path, f"{OTHER_IP}:{recorder.port}") == 404
            # The lookups behind those requests finish in the background: wait until the
            # poisoned provider was checked and refused before looking at the listener.
            await wait_until(
                lambda: honest.engine.counters.providers_refused and rogue.asked, within=SETTLE_S
            )
            assert honest.engine.counters.providers_refused >= 1
    finally:
        await store.close()
    assert recorder.connections == 0


async def test_redirects_from_a_peer_are_not_followed(
    cluster: ClusterPki, recorder: ConnectionRecorder, tmp_path: Path
) -> None:
    redirects: list[str] = []

    async def redirect(request: web.Request) -> web.Response:
        redirects.append(request.path)
        target = f"https://{OTHER_IP}:{recorder.port}{request.path_qs}"
        return web.Response(status=307, headers={"Location": target})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", redirect)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context(cluster.peer))
    await site.start()
    port = runner.addresses[0][1]
    store = OciLayoutStore(tmp_path / "layout", create=True)
    try:
        async with FakeDiscovery() as discovery:
            discovery.provide([DIGEST], ("127.0.0.1", port))
            async with serve_registry(
                store, tmp_path, discovery=discovery.address, tls=cluster.node
            ) as registry:
                path = f"/v2/library/app/blobs/{DIGEST}"
                status = await _get(registry, cluster, path, "docker.io")
        assert status == 404
        assert redirects, "the peer was never asked"
    finally:
        await store.close()
        await runner.cleanup()
    assert recorder.connections == 0


def _fill_bucket_of(node: DiscoveryService, node_id: bytes) -> None:
    """Fills the routing-table bucket `node_id` falls in with contacts nobody runs, up to the
    point where a newcomer there waits for a ping-before-evict (so it stays out for now)."""
    engine = node.engine
    own = id_int(engine.node_id)
    shared = common_prefix_length(engine.node_id, node_id)
    for suffix in range(1, 1000):
        filler = Contact(int_id(with_prefix(own, shared, suffix)), "127.0.0.1", 9, 9)
        if engine.node.table.add(filler, engine.clock()).status is AddStatus.PING:
            return
    raise AssertionError("the bucket never filled")


def _with_registry_port(node: DiscoveryService, port: int) -> pb.Contact:
    """`node` as a rogue names it: right ID and address, a registry port of its choosing."""
    return pb.Contact(
        node_id=node.engine.node_id,
        address="127.0.0.1",
        discovery_port=node.engine.discovery_port,
        registry_port=port,
    )


def _digest_near(node_id: bytes) -> str:
    """A digest whose DHT key is far closer to `node_id` than to any filler, so the lookup
    asks that node first."""
    for i in range(1_000_000):
        digest = "sha256:" + hashlib.sha256(i.to_bytes(4, "big")).hexdigest()
        if common_prefix_length(dht_key(digest), node_id) >= 16:
            return digest
    raise AssertionError("no digest found")


@pytest.fixture
async def b(cluster: ClusterPki, tmp_path: Path) -> AsyncIterator[DiscoveryService]:
    """An honest node the honest node A has not heard of, its registry on port 7002."""
    async with discovery_node(
        discovery_config(tmp_path / "b", cluster.peer, registry_port=7002)
    ) as node:
        yield node


async def test_a_provider_behind_a_full_bucket_keeps_the_ports_it_answered(
    honest: DiscoveryService, rogue: RoguePeer, b: DiscoveryService
) -> None:
    # The rogue names a real node as provider, with a registry port of its own choosing.
    rogue.poison = [_with_registry_port(b, 9999)]
    _fill_bucket_of(honest, b.engine.node_id)
    found = await find_providers(honest.local_address, _digest_near(rogue.node_id))
    assert [(r.provider.node_id, r.provider.registry_port) for r in found] == [
        (b.engine.node_id, 7002)
    ]


async def test_a_contact_named_by_a_peer_keeps_the_ports_it_answered(
    honest: DiscoveryService, rogue: RoguePeer, b: DiscoveryService
) -> None:
    rogue.nodes = [_with_registry_port(b, 9999)]
    # The lookup asks the rogue, which names b; b answers, and b is remembered.
    await honest.engine.lookup_nodes(b.engine.node_id)
    await wait_until(lambda: b.engine.node_id in honest.engine.node.table, within=SETTLE_S)
    known = honest.engine.node.table.get(b.engine.node_id)
    assert known is not None
    assert (known.discovery_port, known.registry_port) == (b.engine.discovery_port, 7002)


async def test_a_peer_answering_under_another_nodes_id_is_not_believed(
    cluster: ClusterPki, tmp_path: Path
) -> None:
    # The rogue holds a cluster certificate (its own key) but answers pings as node b, and
    # names contacts at its own address under IDs it minted (a Sybil attack through answers).
    async with RoguePeer(cluster.other) as rogue:
        cfg_b = discovery_config(tmp_path / "b", cluster.peer, registry_port=7002)
        async with discovery_node(cfg_b) as b:
            rogue.node_id = b.engine.node_id
            minted = os.urandom(32)
            rogue.nodes = [
                pb.Contact(
                    node_id=minted,
                    address="127.0.0.1",
                    discovery_port=int(rogue.address.rsplit(":", 1)[1]),
                    registry_port=9999,
                )
            ]
            cfg = discovery_config(tmp_path / "a", cluster.node, bootstrap=[rogue.address])
            service = DiscoveryService(cfg)
            await service.start()
            try:
                # A fixed interval on purpose (bootstrap attempts and their retries go by): the
                # point is that none of the rogue's answers gets in, which no condition shows.
                await asyncio.sleep(2.0)
                table = service.engine.node.table
                assert b.engine.node_id not in table
                assert minted not in table
                assert len(table) == 0
                assert not service.engine.ready.is_set()
                assert service.engine.client.refused_answers >= 1
            finally:
                await service.stop()


async def test_a_node_named_at_a_wrong_address_is_not_taken_for_dead(
    honest: DiscoveryService, cluster: ClusterPki, recorder: ConnectionRecorder, tmp_path: Path
) -> None:
    # A peer may name node b (which the honest node knows) at an address where nothing answers
    # for b, as provider or as contact: the checks and calls there fail, which says nothing
    # about b itself. Here the honest node makes those calls directly, twice each (failures
    # in a row that would take b for dead), with no call to b's real address between them.
    cfg_b = discovery_config(
        tmp_path / "b", cluster.peer, registry_port=7002, bootstrap=[honest.peer_address]
    )
    async with discovery_node(cfg_b) as b:
        assert b.engine.node_id in honest.engine.node.table
        elsewhere = Contact(b.engine.node_id, OTHER_IP, recorder.port, recorder.port)
        client = honest.engine.client
        for _ in range(2):
            assert await client.ping_as(elsewhere) is None
            assert await client.find_node(elsewhere, b.engine.node_id) is None
        assert b.engine.node_id in honest.engine.node.table
        assert honest.engine.counters.nodes_dropped == 0
