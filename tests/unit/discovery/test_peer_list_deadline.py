"""A peer-list URL that trickles its answer is given up on as a whole, not byte by byte."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from services.discovery.bootstrap import BootstrapSources, gather_endpoints
from tests.harness.http_stub import QuietHandler, serve_http


@pytest.fixture
def trickling_url() -> Iterator[str]:
    """A loopback server sending one byte of its announced body every 0.2 s."""
    done = threading.Event()

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            try:
                while not done.is_set():
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(0.2)  # the trickle is the fault: a body that never ends in time
            except OSError:
                pass

    try:
        with serve_http(Handler) as base:
            yield f"{base}/v1-k3s/p2p"
    finally:
        done.set()


async def test_a_trickling_peer_list_fails_as_a_whole(trickling_url: str) -> None:
    # Each byte arrives well inside the socket timeout; only the overall bound ends the fetch.
    sources = BootstrapSources(url=trickling_url, url_timeout=1.0)
    gathered = await gather_endpoints(sources)
    assert gathered.endpoints == []
    assert len(gathered.problems) == 1
    assert "not received within 1.0 s" in gathered.problems[0]
