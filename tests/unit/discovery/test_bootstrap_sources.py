"""Bootstrap sources: peer-list parsing, backoff, and resolving real sources on loopback."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator

import pytest

from services.discovery.bootstrap import (
    BACKOFF_CAP,
    BootstrapEndpoint,
    BootstrapSources,
    backoff_delay,
    gather_endpoints,
    parse_peer_entry,
    parse_peer_list,
)
from tests.harness.http_stub import QuietHandler, serve_http


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("10.0.0.1:5001", ("10.0.0.1", 5001)),
        ("10.0.0.1", ("10.0.0.1", 7000)),
        ("[fd00::1]:5005", ("fd00::1", 5005)),
        ("fd00::1", ("fd00::1", 7000)),
        ("[fd00::1]", ("fd00::1", 7000)),
        ("node-a.cluster.local:5001", ("node-a.cluster.local", 5001)),
        ("node-a", ("node-a", 7000)),
        ("/ip4/10.0.0.2/tcp/5001/p2p/12D3KooWabc", ("10.0.0.2", 5001)),
        ("/ip6/fd00::2/tcp/6001", ("fd00::2", 6001)),
        ("/dns4/seed.example/tcp/5002", ("seed.example", 5002)),
        ("/ip4/10.0.0.3", ("10.0.0.3", 7000)),
    ],
)
def test_parse_peer_entry(entry: str, expected: tuple[str, int]) -> None:
    assert parse_peer_entry(entry, 7000) == expected


@pytest.mark.parametrize("entry", ["", "  ", ":5001", "10.0.0.1:0", "10.0.0.1:x", "/tcp/5001"])
def test_parse_peer_entry_rejects(entry: str) -> None:
    with pytest.raises(ValueError):
        parse_peer_entry(entry, 7000)


def test_parse_peer_list_skips_bad_entries_and_rejects_non_lists() -> None:
    body = json.dumps(["10.0.0.1:5001", 42, "", "/ip4/10.0.0.2/tcp/5001/p2p/x", "b:0"]).encode()
    assert parse_peer_list(body, 5001) == [("10.0.0.1", 5001), ("10.0.0.2", 5001)]
    with pytest.raises(ValueError):
        parse_peer_list(b'{"peers": []}', 5001)
    with pytest.raises(ValueError):
        parse_peer_list(b"not json", 5001)


def test_backoff_grows_then_stays_capped() -> None:
    rng = random.Random(1)
    delays = [backoff_delay(a, rng) for a in range(12)]
    assert delays[0] < delays[2] < delays[4]
    assert all(d <= BACKOFF_CAP for d in delays)
    assert delays[-1] >= BACKOFF_CAP * 0.8


def test_sources_configured() -> None:
    assert not BootstrapSources().configured
    assert BootstrapSources(peers=["10.0.0.1:5001"]).configured
    assert BootstrapSources(dns="peers.example").configured
    assert BootstrapSources(url="http://127.0.0.1:1/p2p").configured


@pytest.fixture
def peer_list_url() -> Iterator[str]:
    """An HTTP server on loopback answering a K3s-style peer list."""
    body = json.dumps(["127.0.0.1:5101", "/ip4/127.0.0.2/tcp/5102/p2p/x"]).encode()

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            status = 200 if self.path == "/v1-k3s/p2p" else 404
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body if status == 200 else b"{}")

    with serve_http(Handler) as base:
        yield base


async def test_gather_endpoints_from_every_source(peer_list_url: str) -> None:
    sources = BootstrapSources(
        peers=["127.0.0.3:5103", "bad:0"],
        dns="localhost:5104",
        url=f"{peer_list_url}/v1-k3s/p2p",
        default_port=5001,
    )
    gathered = await gather_endpoints(sources)
    assert BootstrapEndpoint("127.0.0.3", 5103) in gathered.endpoints
    assert BootstrapEndpoint("127.0.0.1", 5104) in gathered.endpoints  # localhost's A record
    assert BootstrapEndpoint("127.0.0.1", 5101) in gathered.endpoints
    assert BootstrapEndpoint("127.0.0.2", 5102) in gathered.endpoints
    assert gathered.endpoints == sorted(set(gathered.endpoints))
    assert len(gathered.problems) == 1 and "bootstrap_peers 'bad:0'" in gathered.problems[0]


async def test_gather_endpoints_reports_failing_sources(peer_list_url: str) -> None:
    sources = BootstrapSources(
        dns="no-such-host.invalid", url=f"{peer_list_url}/missing", url_timeout=2.0
    )
    gathered = await gather_endpoints(sources)
    assert gathered.endpoints == []
    assert any("bootstrap_dns" in p and "cannot resolve" in p for p in gathered.problems)
    assert any("bootstrap_url" in p and "404" in p for p in gathered.problems)
