"""`free_port` hands out ports no client socket can take between the pick and the listen.

A port picked by binding to 0 comes from the kernel's ephemeral range, the same range every
outgoing connection's local port comes from: a test's own gRPC client could take it before the
service listens on it (CI saw "Address already in use" that way).
"""

from __future__ import annotations

import socket

from tests.harness.service_procs import ephemeral_range, free_port


def test_ports_lie_below_the_ephemeral_range() -> None:
    low, _ = ephemeral_range()
    ports = [free_port() for _ in range(50)]
    assert all(1024 <= port < low for port in ports), ports


def test_no_port_is_handed_out_twice() -> None:
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)


def test_a_port_in_use_is_never_handed_out() -> None:
    held = []
    try:
        for _ in range(20):
            port = free_port()
            sock = socket.socket()
            sock.bind(("127.0.0.1", port))
            sock.listen()
            held.append(sock)
        in_use = {s.getsockname()[1] for s in held}
        assert not in_use & {free_port() for _ in range(100)}
    finally:
        for sock in held:
            sock.close()
