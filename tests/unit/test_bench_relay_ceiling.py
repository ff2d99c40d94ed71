"""The relay benchmark's ceilings: what no relay (or local TLS serve) can beat when the whole chain
shares the cores."""

from __future__ import annotations

import pytest

from bench.relay_paths import local_ceiling, relay_ceiling, socket_io

# CPU-s per GB by process, as bench.relay_paths measures them (an mTLS run on 2 cores).
CPU = {
    "relay": {"client": 0.63, "n1 registry": 1.19, "n3 registry": 2.48},
    "local": {"client": 0.60, "n1 registry": 1.02},
    "registry": {"client": 0.79, "docker-registry": 1.11},
}


def test_the_chain_is_the_client_the_cheapest_server_and_the_relaying_nodes_floor() -> None:
    # 0.63 (client) + 1.02 (node 1 serves cheaper than docker-registry) + 1.29 (floor).
    assert relay_ceiling(CPU, 1.29, 2) == pytest.approx(2 / 2.94)


def test_the_cheaper_server_counts_whichever_it_is() -> None:
    cheap_anchor = {**CPU, "registry": {"client": 0.79, "docker-registry": 0.5}}
    assert relay_ceiling(cheap_anchor, 1.29, 2) == pytest.approx(2 / (0.63 + 0.5 + 1.29))


def test_more_cores_raise_the_ceiling_in_proportion() -> None:
    assert relay_ceiling(CPU, 0.57, 4) == pytest.approx(2 * relay_ceiling(CPU, 0.57, 2))


def test_a_relays_socket_io_is_the_receive_and_the_send_measured_on_the_plain_relay_path() -> None:
    # The peers serving the blob split it (one GET each); together they sent it once.
    plain = {
        "relay": {"client": 0.19, "n1 registry": 0.10, "n2 registry": 0.07, "n3 registry": 1.3}
    }
    assert socket_io(plain) == pytest.approx(0.19 + 0.10 + 0.07)


def test_the_relaying_node_itself_is_not_counted_as_socket_io() -> None:
    assert socket_io({"relay": {"n3 registry": 1.3}}) == 0.0


def test_a_local_serve_chain_is_its_client_one_encryption_and_the_plain_serve() -> None:
    # 0.60 (the local path's client) + 0.45 (encrypting each byte once) + 0.25 (serving it plain).
    assert local_ceiling(CPU, 0.45, 0.25, 2) == pytest.approx(2 / 1.30)


def test_the_local_ceiling_ignores_the_relay_paths_client() -> None:
    dear_relay_client = {**CPU, "relay": {"client": 5.0}}
    assert local_ceiling(dear_relay_client, 0.45, 0.25, 2) == local_ceiling(CPU, 0.45, 0.25, 2)
