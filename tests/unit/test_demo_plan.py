"""The demo's pure parts: port plan, generated node configs, attribution, report, verification."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from services.cli.demo_plan import (
    DEMO_IMAGE,
    PORTS_PER_NODE,
    Listener,
    PullReport,
    ServedItem,
    answered,
    counter_deltas,
    node_config,
    peer_servers,
    plan_mesh,
    render_mesh_up,
    render_summary,
    repository_path,
    servers_of,
    short_digest,
)
from services.cli.demo_pull import verify_layout
from services.common.config import load_config
from services.common.oci.synthetic import build_image
from services.common.units import format_bytes

DIGEST = "sha256:" + "ab" * 32


def test_every_port_of_the_plan_is_distinct_and_named_by_node(tmp_path: Path) -> None:
    nodes = plan_mesh(3, 15000, tmp_path)
    ports = [p for n in nodes for p in n.ports]
    assert len(ports) == len(set(ports)) == 3 * PORTS_PER_NODE == 24
    assert [n.port(Listener.REGISTRY) for n in nodes] == [15001, 15002, 15003]
    assert nodes[0].address(Listener.PINNER_METRICS) == "127.0.0.1:15701"
    assert [n.name for n in nodes] == ["node1", "node2", "node3"]
    assert nodes[2].registry_url == "http://127.0.0.1:15003"
    assert nodes[1].directory == tmp_path / "node2"


@pytest.mark.parametrize(("count", "base"), [(1, 15000), (100, 15000), (3, 80), (3, 65400)])
def test_impossible_plans_are_refused(tmp_path: Path, count: int, base: int) -> None:
    with pytest.raises(ValueError):
        plan_mesh(count, base, tmp_path)


def test_generated_configs_load_and_chain_to_node1(tmp_path: Path) -> None:
    nodes = plan_mesh(3, 15000, tmp_path)
    registries = tmp_path / "registries.yaml"
    for node in nodes:
        path = tmp_path / f"{node.name}.yaml"
        path.write_text(yaml.safe_dump(node_config(node, nodes[0], registries)))
        cfg = load_config(path, {})
        assert cfg.store.backend == "oci-layout"
        assert cfg.store.oci_layout_path == node.layout_path
        assert cfg.registry.port == node.port(Listener.REGISTRY)
        assert cfg.registry.host == cfg.discovery.host == "127.0.0.1"
        assert cfg.registry.default_registry == "docker.io"
        assert cfg.registry.registries_file == registries
        assert not cfg.pinner.write_hosts and not cfg.pinner.mirror_tls
        assert cfg.discovery.local_address == node.address(Listener.DISCOVERY_LOCAL)
        want = [] if node is nodes[0] else [nodes[0].address(Listener.DISCOVERY)]
        assert cfg.discovery.bootstrap_peers == want


def test_repository_path_of_docker_io_images() -> None:
    assert repository_path(DEMO_IMAGE) == ("library/peermirror-demo", "1.0")
    with pytest.raises(ValueError):
        repository_path("quay.io/x/y:1")


def test_attribution_needs_both_a_provider_and_a_peer_answer() -> None:
    assert servers_of({"node1", "node2"}, ["node1"], "node3") == ("node1",)
    assert servers_of({"node2", "node10"}, ["node10", "node2"], "node3") == ("node2", "node10")
    # Nobody answered a peer request: the puller's own store served it.
    assert servers_of({"node1"}, [], "node3") == ("node3",)


def test_counter_deltas_and_who_answered() -> None:
    before = {"node1": {"blob_peer": 2}, "node2": {"blob_peer": 5}}
    after = {"node1": {"blob_peer": 6}, "node2": {"blob_peer": 5}, "node3": {"blob_peer": 0}}
    deltas = counter_deltas(before, after)
    assert deltas == {
        "node1": {"blob_peer": 4},
        "node2": {"blob_peer": 0},
        "node3": {"blob_peer": 0},
    }
    assert answered(deltas, "blob_peer") == ["node1"]


def test_peer_servers_sum_requests_and_leave_out_the_puller() -> None:
    deltas = {
        "node3": {"manifest_peer": 1, "blob_peer": 0, "bytes_served_local": 9},
        "node1": {"manifest_peer": 1, "blob_peer": 3, "bytes_served_local": 700},
        "node2": {"manifest_peer": 0, "blob_peer": 0, "bytes_served_local": 0},
    }
    assert peer_servers(deltas, "node3") == [("node1", 4, 700)]


def test_human_sizes_and_short_digests() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * 1024 * 1024) == "3.0 MiB"
    assert short_digest(DIGEST) == "sha256:abababababab"


def report(verified: bool = True) -> PullReport:
    items = [
        ServedItem("manifest", DIGEST, 500, True, ("node1",)),
        ServedItem("config", DIGEST, 300, True, ("node1",)),
        ServedItem("layer", DIGEST, 1024 * 1024, verified, ("node1",)),
    ]
    return PullReport(
        DEMO_IMAGE,
        "node1",
        "node3",
        "http://127.0.0.1:15003",
        "skopeo 1.9",
        0.5,
        items,
        1024 * 1024,
        peers=[("node1", 3, 1024 * 1024 + 800)],
    )


def test_summary_names_server_and_verification_per_item() -> None:
    lines = render_summary(report())
    text = "\n".join(lines)
    assert "through node3's registry http://127.0.0.1:15003 with skopeo 1.9" in lines[0]
    assert text.count("node1  verified") == 3
    assert "all 2 blobs and 1 manifest verified" in text
    assert "node3 relayed 1.0 MiB from peers" in text
    assert "node1 answered 3 peer requests, sending 1.0 MiB" in text


def test_summary_reports_a_failed_verification() -> None:
    text = "\n".join(render_summary(report(verified=False)))
    assert "DIGEST MISMATCH" in text
    assert "1 of 3 items FAILED verification" in text


def test_mesh_up_lists_every_registry(tmp_path: Path) -> None:
    lines = render_mesh_up(plan_mesh(2, 15000, tmp_path), tmp_path)
    assert lines[0] == "mesh is up: node1 http://127.0.0.1:15001, node2 http://127.0.0.1:15002"
    assert "Ctrl-C" in lines[1]


def test_verify_layout_hashes_every_item_and_catches_a_changed_blob(tmp_path: Path) -> None:
    image = build_image(tmp_path / "layout", DEMO_IMAGE, layers=2, layer_size=2048)
    items = verify_layout(tmp_path / "layout", DEMO_IMAGE)
    assert sorted(i.kind for i in items) == ["config", "layer", "layer", "manifest"]
    assert {i.digest for i in items} == {b.digest for b in image.blobs}
    assert all(i.verified for i in items)
    layer = image.platforms[0].layers[0].descriptor.digest
    path = image.blob_path(layer)
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    bad = {i.digest for i in verify_layout(tmp_path / "layout", DEMO_IMAGE) if not i.verified}
    assert bad == {layer}


def test_verify_layout_walks_an_index(tmp_path: Path) -> None:
    image = build_image(
        tmp_path / "layout",
        DEMO_IMAGE,
        layers=1,
        layer_size=1024,
        platforms=["linux/amd64", "linux/arm64"],
    )
    items = verify_layout(tmp_path / "layout", DEMO_IMAGE)
    assert sorted(i.kind for i in items) == [
        "config",
        "config",
        "index",
        "layer",
        "layer",
        "manifest",
        "manifest",
    ]
    assert {i.digest for i in items} == {b.digest for b in image.blobs}
