"""Joining through a DNS name or a peer-list URL; bootstrapping again after losing every peer."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.discovery.service import DiscoveryService
from tests.harness.discovery_mesh import FAST_PROBING, node_config
from tests.harness.http_stub import QuietHandler, serve_http
from tests.harness.service_procs import free_port
from tests.harness.wait import wait_until

TIMINGS = FAST_PROBING


@pytest.fixture
def peer_list() -> Iterator[tuple[str, list[str]]]:
    """A loopback HTTP server answering GET /v1-k3s/p2p with the (mutable) list given."""
    listed: list[str] = []

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            body = json.dumps(listed).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    with serve_http(Handler) as base:
        yield f"{base}/v1-k3s/p2p", listed


async def test_nodes_join_through_a_dns_name_and_a_peer_list_url(
    tmp_path: Path, peer_list: tuple[str, list[str]]
) -> None:
    url, listed = peer_list
    first = DiscoveryService(node_config(tmp_path, 0, [], **TIMINGS))
    services = [first]
    try:
        await first.start()
        listed.append(f"/ip4/127.0.0.1/tcp/{first.peer_server.port}/p2p/ignored")
        by_dns = DiscoveryService(
            node_config(tmp_path, 1, [], bootstrap_dns=f"localhost:{first.peer_server.port}")
        )
        by_url = DiscoveryService(node_config(tmp_path, 2, [], bootstrap_url=url, **TIMINGS))
        services += [by_dns, by_url]
        for service in (by_dns, by_url):
            await service.start()
            await asyncio.wait_for(service.engine.ready.wait(), 20.0)
            assert first.engine.node_id in service.engine.node.table
        # The first node learned both from their calls.
        await wait_until(lambda: len(first.engine.node.table) == 2, within=10.0)
    finally:
        for service in services:
            await service.stop()


async def test_a_node_that_lost_every_peer_bootstraps_again(tmp_path: Path) -> None:
    port = free_port()
    seed_config = node_config(tmp_path, 0, [], port=port, **TIMINGS)
    seed = DiscoveryService(seed_config)
    await seed.start()
    joiner = DiscoveryService(node_config(tmp_path, 1, [f"127.0.0.1:{port}"], **TIMINGS))
    try:
        await joiner.start()
        await asyncio.wait_for(joiner.engine.ready.wait(), 20.0)
        seed_id = seed.engine.node_id
        assert seed_id in joiner.engine.node.table
        await seed.stop()
        # The seed is found dead and the routing table empties.
        await wait_until(lambda: len(joiner.engine.node.table) == 0, within=15.0)
        attempts = joiner.engine.counters.bootstrap_attempts
        # The seed comes back (same data dir, so same ID and port) knowing nobody: only
        # the joiner bootstrapping again can reconnect them.
        seed = DiscoveryService(seed_config)
        await seed.start()
        assert seed.engine.node_id == seed_id
        await wait_until(lambda: seed_id in joiner.engine.node.table, within=40.0)
        assert joiner.engine.counters.bootstrap_attempts > attempts
        await wait_until(lambda: joiner.engine.node_id in seed.engine.node.table, within=10.0)
    finally:
        await joiner.stop()
        await seed.stop()
