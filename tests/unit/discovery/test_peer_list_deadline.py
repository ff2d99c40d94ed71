"""A peer-list URL that trickles its answer is given up on as a whole, not byte by byte."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator

import pytest

from services.discovery.bootstrap import BootstrapSources, gather_endpoints


@pytest.fixture
def trickling_url() -> Iterator[str]:
    """A loopback server sending one byte of its announced body every 0.2 s."""
    done = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
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

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1-k3s/p2p"
    finally:
        done.set()
        server.shutdown()
        server.server_close()
        thread.join()


async def test_a_trickling_peer_list_fails_as_a_whole(trickling_url: str) -> None:
    # Each byte arrives well inside the socket timeout; only the overall bound ends the fetch.
    sources = BootstrapSources(url=trickling_url, url_timeout=1.0)
    gathered = await gather_endpoints(sources)
    assert gathered.endpoints == []
    assert len(gathered.problems) == 1
    assert "not received within 1.0 s" in gathered.problems[0]
