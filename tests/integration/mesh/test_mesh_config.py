"""The mesh harness's pure parts: names, subnet choice, node configs (no namespaces, no daemons)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
import yaml

from services.common.config import load_config
from tests.harness import netns
from tests.harness.mesh import (
    DEFAULT_MIRRORS,
    NOWHERE,
    deep_merge,
    node_config_data,
    registries_data,
)


def test_names_carry_the_token_and_fit_interface_limits() -> None:
    names = netns.MeshNames("0a1b2c")
    assert names.namespace("n1") == "pmm-0a1b2c-n1"
    assert names.bridge == "pmb-0a1b2c"
    assert names.veth(254) == "pmv-0a1b2c-254"
    assert len(names.veth(254)) <= netns.IFNAME_MAX
    for name in (names.namespace("upstream"), names.bridge, names.veth(3)):
        assert netns.token_of(name) == "0a1b2c"


@pytest.mark.parametrize("name", ["eth0", "pmb-0A1B2C", "pmm-0a1b2-n1", "docker0", "pmv-0a1b2c"])
def test_foreign_names_have_no_token(name: str) -> None:
    assert netns.token_of(name) is None


def test_bad_tokens_and_labels_are_refused() -> None:
    with pytest.raises(ValueError):
        netns.MeshNames("xyz")
    with pytest.raises(ValueError):
        netns.MeshNames("0a1b2c").namespace("N1; rm")


def test_pick_subnet_skips_every_overlapping_network() -> None:
    used = [
        ipaddress.IPv4Network("10.213.0.0/24"),
        ipaddress.IPv4Network("10.213.1.128/25"),
        ipaddress.IPv4Network("192.0.2.0/24"),
    ]
    assert netns.pick_subnet(used) == ipaddress.IPv4Network("10.213.2.0/24")
    assert netns.pick_subnet([]) == ipaddress.IPv4Network("10.213.0.0/24")
    with pytest.raises(ValueError):
        netns.pick_subnet([ipaddress.IPv4Network("10.0.0.0/8")])


def test_host_address_stays_inside_the_subnet() -> None:
    subnet = ipaddress.IPv4Network("10.213.7.0/24")
    assert str(netns.host_address(subnet, 3)) == "10.213.7.3/24"
    assert str(netns.host_address(subnet, netns.BRIDGE_HOST)) == "10.213.7.254/24"
    for bad in (0, 255):
        with pytest.raises(ValueError):
            netns.host_address(subnet, bad)


def test_parse_networks_reads_routes_and_addresses() -> None:
    routes = (
        '[{"dst":"default","gateway":"192.0.2.1"},{"dst":"10.213.4.0/24","dev":"pmb-x"},'
        '{"dst":"10.1.2.3","type":"local"}]'
    )
    addrs = '[{"ifname":"eth0","addr_info":[{"local":"192.0.2.2","prefixlen":24}]}]'
    assert netns.parse_networks(routes) + netns.parse_networks(addrs) == [
        ipaddress.IPv4Network("10.213.4.0/24"),
        ipaddress.IPv4Network("10.1.2.3/32"),
        ipaddress.IPv4Network("192.0.2.0/24"),
    ]


def test_isolate_rules_drop_both_directions_on_the_veth() -> None:
    rules = netns.isolate_rules()
    assert [r[0] for r in rules] == ["INPUT", "OUTPUT"]
    assert all(r[-2:] == ["-j", "DROP"] and netns.ISOLATE_COMMENT in r for r in rules)
    assert rules[0][1:3] == ["-i", "eth0"] and rules[1][1:3] == ["-o", "eth0"]


def test_deep_merge_merges_sections_and_replaces_leaves() -> None:
    base = {"discovery": {"port": 5001, "bootstrap_peers": ["a"]}, "log": {"level": "info"}}
    merged = deep_merge(base, {"discovery": {"bootstrap_peers": ["b"]}, "node": {"name": "x"}})
    assert merged == {
        "discovery": {"port": 5001, "bootstrap_peers": ["b"]},
        "log": {"level": "info"},
        "node": {"name": "x"},
    }
    assert base["discovery"] == {"port": 5001, "bootstrap_peers": ["a"]}


def test_node_config_is_accepted_by_the_real_loader(tmp_path: Path) -> None:
    data = node_config_data(
        name="n2",
        ip="10.213.7.2",
        node_dir=tmp_path,
        containerd_socket=str(tmp_path / "containerd.sock"),
        content_root=tmp_path / "content",
        hosts_dir=tmp_path / "certs.d",
        registry_port=7443,
        bootstrap_peers=["10.213.7.1:5001"],
    )
    path = tmp_path / "peermirror.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = load_config(path, env={})
    assert cfg.node.address == "10.213.7.2"
    assert cfg.registry.port == 7443 and cfg.registry.host == "0.0.0.0"
    assert cfg.discovery.bootstrap_peers == ["10.213.7.1:5001"]
    # Node-local APIs on unix sockets in the node's dir: reachable from outside the namespace.
    for address in (
        cfg.discovery.local_address,
        cfg.pinner.grpc_address,
        cfg.registry.grpc_address,
    ):
        assert address.startswith(f"unix:{tmp_path}/")
    assert cfg.pinner.certs_dir == tmp_path / "certs.d"
    assert cfg.store.backend == "containerd"


def test_registries_document_mirrors_each_registry_at_the_given_endpoints() -> None:
    assert registries_data(DEFAULT_MIRRORS) == {
        "mirrors": {
            "docker.io": {"endpoint": [NOWHERE]},
            "registry.test:5000": {"endpoint": [NOWHERE]},
        }
    }
