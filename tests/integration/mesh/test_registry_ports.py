"""Nodes whose registries listen on different ports exchange images: an agent on 6443 and a K3s
server, where 6443 belongs to K3s, on 6445. Each node advertises its own port through discovery,
peers fetch from the advertised port, and each pinner points its containerd at its own port."""

from __future__ import annotations

import tomllib
from pathlib import Path

import grpc
import pytest

from services.common.genproto.peermirror.discovery.v1 import local_pb2 as lpb
from services.common.genproto.peermirror.discovery.v1 import local_pb2_grpc as lpb_grpc
from tests.harness.fixtures_mesh import MeshFactory
from tests.harness.images import BuiltImage, build_image
from tests.harness.mesh import NOWHERE, MeshNode, pull_via_mirror
from tests.harness.wait import eventually

pytestmark = [pytest.mark.containerd, pytest.mark.slow]

AGENT_PORT = 6443
SERVER_PORT = 6445
# Generous: two shared cores; the pinner advertises after containerd's import event.
ADVERTISE_TIMEOUT = 60.0


def providers(node: MeshNode, key: str) -> set[tuple[str, int]]:
    """(address, registry port) of every provider of `key` that `node`'s discovery finds."""
    with grpc.insecure_channel(node.grpc_address("discovery")) as channel:
        stub = lpb_grpc.LocalDiscoveryStub(channel)
        replies = stub.FindProviders(lpb.FindProvidersRequest(key=key), timeout=5)
        return {(r.provider.address, r.provider.registry_port) for r in replies}


def import_image(node: MeshNode, image: BuiltImage, work: Path) -> None:
    archive = image.write_oci_archive(work / f"{node.name}.tar")
    node.ctr("images", "import", "--all-platforms", str(archive))


def image_digest(node: MeshNode, name: str) -> str:
    """The target digest `node`'s containerd records for image `name`."""
    for line in node.ctr("images", "ls").splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == name:
            return next(f for f in fields if f.startswith("sha256:"))
    raise AssertionError(f"{name} not in {node.name}'s image store")


def test_agent_and_server_ports_exchange_images(mesh_factory: MeshFactory, tmp_path: Path) -> None:
    mesh = mesh_factory(
        2, registry_ports=[AGENT_PORT, SERVER_PORT], overrides={"tls": {"enabled": False}}
    )
    agent, server = mesh.nodes
    assert (agent.registry_port, server.registry_port) == (AGENT_PORT, SERVER_PORT)

    # Each pinner sends its own containerd to its own registry port, and nowhere else.
    for node in mesh.nodes:
        hosts = tomllib.loads((node.hosts_dir / "docker.io" / "hosts.toml").read_text())
        assert set(hosts["host"]) == {f"http://127.0.0.1:{node.registry_port}/v2"}
        assert hosts["server"] == f"{NOWHERE}/v2"

    on_agent = build_image(tmp_path / "a", name="docker.io/library/on-agent:1.0", seed=1)
    on_server = build_image(tmp_path / "s", name="docker.io/library/on-server:1.0", seed=2)
    import_image(agent, on_agent, tmp_path)
    import_image(server, on_server, tmp_path)

    # Discovery hands out each holder's own registry port.
    expected = {
        (server, on_agent.target.digest): {(agent.ip, AGENT_PORT)},
        (agent, on_server.target.digest): {(server.ip, SERVER_PORT)},
    }
    for (asker, key), want in expected.items():

        def found(
            asker: MeshNode = asker, key: str = key, want: set[tuple[str, int]] = want
        ) -> bool:
            return providers(asker, key) == want

        assert eventually(found, ADVERTISE_TIMEOUT), (
            f"{asker.name} finds {providers(asker, key)} for {key}, not {want}"
        )

    # Every endpoint but the local mirror is 127.0.0.1:9, so these pulls can only come from
    # the peer; containerd verifies every digest it commits.
    pull_via_mirror(server, on_agent.name)
    pull_via_mirror(agent, on_server.name)
    assert image_digest(server, on_agent.name) == on_agent.target.digest
    assert image_digest(agent, on_server.name) == on_server.target.digest
    for node, image in ((server, on_agent), (agent, on_server)):
        held = {line.split()[0] for line in node.ctr("content", "ls").splitlines()[1:] if line}
        assert {blob.digest for blob in image.blobs} <= held
