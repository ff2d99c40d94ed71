"""A stub HTTP server on a loopback port, run in a thread, for tests of HTTP clients.

A test subclasses `QuietHandler` with the answers it needs (a fault, a fixed body) and serves it
with `serve_http`, which yields the server's base URL and stops it afterwards.
"""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator


class QuietHandler(http.server.BaseHTTPRequestHandler):
    """A request handler that keeps out of the test's output (no line per request)."""

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def serve_http(handler: type[QuietHandler]) -> Iterator[str]:
    """Serve `handler` on 127.0.0.1 (a free port) until the block ends; yields
    ``http://127.0.0.1:PORT``. Requests run in threads of their own, not waited for at the end
    (a handler that is the fault itself, such as a trickle, must end on its own)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
