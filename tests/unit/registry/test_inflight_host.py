"""Only clients on this host may make the registry fetch from upstream (no open proxy)."""

from __future__ import annotations

import pytest

from services.registry.inflight.serving import on_this_host


@pytest.mark.parametrize(
    ("client", "server"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("127.0.0.3", "10.0.0.1"),  # any loopback source is this host
        ("::1", "::1"),
        ("::ffff:127.0.0.1", "::"),
        ("10.0.0.1", "10.0.0.1"),  # containerd dialing the node's own address
        ("::ffff:10.0.0.1", "10.0.0.1"),
        ("fe80::1%eth0", "fe80::1"),
    ],
)
def test_clients_on_this_host(client: str, server: str) -> None:
    assert on_this_host(client, server)


@pytest.mark.parametrize(
    ("client", "server"),
    [
        ("10.0.0.2", "10.0.0.1"),  # another node (or anyone) on the network
        ("192.0.2.7", "0.0.0.0"),
        ("2001:db8::2", "2001:db8::1"),
        ("", "10.0.0.1"),
        ("not-an-ip", "10.0.0.1"),
        ("10.0.0.1", ""),
    ],
)
def test_clients_elsewhere(client: str, server: str) -> None:
    assert not on_this_host(client, server)
