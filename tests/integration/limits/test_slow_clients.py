"""Slow and idle clients cannot starve the registry: pulls go on, the slow client is cut off."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fuzz.raw_http import pull_served_image
from tests.harness.fuzz_node import REQUEST_TIMEOUT_S, FuzzNode, fuzz_node, raise_open_files

IDLE_CONNECTIONS = 1000
# Headers one byte a second: far longer than the request timeout to send in full.
SLOW_REQUEST = b"GET /v2/library/fuzz/manifests/1.0?ns=docker.io HTTP/1.1\r\nHost: x\r\n\r\n"

pytestmark = pytest.mark.slow


@pytest.fixture
def node(tmp_path: Path) -> Iterator[FuzzNode]:
    # Our 1,000 sockets plus the registry's 1,000 (it inherits the limit), with headroom.
    assert raise_open_files(4 * IDLE_CONNECTIONS) >= 3 * IDLE_CONNECTIONS
    with fuzz_node(tmp_path) as running:
        yield running


def test_slow_loris_and_idle_connections_do_not_stop_pulls(node: FuzzNode) -> None:
    port = node.ports.registry_http
    idle = []
    slow = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        for _ in range(IDLE_CONNECTIONS):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=30))
        sent = 0
        pulls = 0
        answer = b""
        # Feed the slow client a byte a second and pull meanwhile, until the server cuts it off.
        while sent < len(SLOW_REQUEST):
            try:
                slow.sendall(SLOW_REQUEST[sent : sent + 1])
            except OSError:
                break  # reset by the server
            sent += 1
            pull_served_image(node)
            pulls += 1
            slow.settimeout(1.0)
            try:
                answer = slow.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                break
            break  # an answer (the 408) or EOF: the server has let go of this client
        # Cut off well before the request could be complete, after at least one pull succeeded.
        assert sent < len(SLOW_REQUEST)
        assert pulls >= 1
        if answer:
            assert answer.startswith(b"HTTP/1.1 408")
        # The idle connections were let go too (keep-alive/request timeout), and pulls still work.
        # Each read blocks until the server closes that socket: one bound for them all.
        deadline = time.monotonic() + REQUEST_TIMEOUT_S + 5.0
        closed = 0
        for sock in idle:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                if sock.recv(1) in (b"",):
                    closed += 1
            except (TimeoutError, OSError):
                pass
        assert closed == IDLE_CONNECTIONS
        pull_served_image(node)
        assert node.alive("registry")
    finally:
        slow.close()
        for sock in idle:
            sock.close()
