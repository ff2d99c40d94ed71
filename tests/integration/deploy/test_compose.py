"""docker-compose.yml for real: the compose node comes up healthy and pulls an image from a peer.

The repository's docker-compose.yml runs against a private dockerd with an override that only
points it at this test's containerd, ports and peer (compose_override.py). The peer is a netns
mesh node holding an image; this test's containerd pulls it through the compose node's registry
with the hosts.toml the compose node's pinner wrote, and every blob is checked against its digest.
"""

from __future__ import annotations

import hashlib
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness.containerd import ContainerdDaemon
from tests.harness.fixtures_mesh import running_mesh
from tests.harness.images import BuiltImage, build_image
from tests.harness.mesh import Mesh
from tests.harness.mesh_p2p import import_image, served_to_peers
from tests.harness.netns import BRIDGE_HOST, host_address
from tests.harness.service_procs import free_port
from tests.harness.wait import eventually, wait_for
from tests.integration.deploy.compose_override import (
    SERVICES,
    NodePorts,
    node_environment,
    override_data,
    registries_yaml,
)
from tests.integration.deploy.conftest import REPO
from tests.integration.deploy.docker_daemon import DockerDaemon

# The first test of a fresh machine also pays for debootstrap and the image build (fixtures).
pytestmark = [pytest.mark.slow, pytest.mark.containerd, pytest.mark.timeout(900)]

COMPOSE = "/usr/bin/docker-compose"
# The shipped healthchecks run every 15 s; the first verdict comes one interval after start.
HEALTHY_TIMEOUT = 120.0
ADVERTISE_TIMEOUT = 90.0
PULL_ATTEMPTS = 3


def _ports() -> NodePorts:
    return NodePorts(
        discovery=free_port("0.0.0.0"),
        registry=free_port("0.0.0.0"),
        **{
            key: free_port("127.0.0.1")
            for key in (
                "discovery_local",
                "registry_grpc",
                "pinner_grpc",
                "discovery_metrics",
                "registry_metrics",
                "pinner_metrics",
            )
        },
    )


class ComposeProject:
    """One docker-compose project of the repository's docker-compose.yml plus an override."""

    def __init__(self, docker: DockerDaemon, override: Path) -> None:
        self.docker = docker
        self.name = f"pmdeploy{uuid.uuid4().hex[:8]}"
        self.files = ["-f", str(REPO / "docker-compose.yml"), "-f", str(override)]

    def run(self, *args: str, timeout: float = 180.0) -> str:
        argv = [COMPOSE, "--project-name", self.name, *self.files, *args]
        return self.docker.run(argv, cwd=REPO, timeout=timeout).stdout

    def container(self, service: str) -> str:
        return self.run("ps", "-q", service).strip()

    def label_filter(self) -> str:
        return f"label=com.docker.compose.project={self.name}"

    def leftovers(self) -> dict[str, list[str]]:
        """Containers, networks and volumes of this project that docker still has."""
        found = {}
        for kind in ("container", "network", "volume"):
            listing = ["ls", "--quiet"] if kind != "container" else ["ls", "--all", "--quiet"]
            out = self.docker.docker(kind, *listing, "--filter", self.label_filter()).stdout
            found[kind] = out.split()
        return found


def wait_healthy(project: ComposeProject) -> dict[str, dict[str, Any]]:
    """Every service's `docker inspect`, once all three report healthy."""
    inspected: dict[str, dict[str, Any] | None] = {}
    health: dict[str, object] = {}

    def all_healthy() -> bool:
        inspected.update(
            {s: project.docker.inspect("container", project.container(s)) for s in SERVICES}
        )
        states = {s: (i or {}).get("State", {}) for s, i in inspected.items()}
        health.update({s: st.get("Health", {}).get("Status") for s, st in states.items()})
        return all(h == "healthy" for h in health.values())

    wait_for(
        "compose services healthy",
        all_healthy,
        HEALTHY_TIMEOUT,
        1.0,
        detail=lambda: f"{health}\n{project.run('logs', '--tail=20')}",
    )
    return {s: i for s, i in inspected.items() if i is not None}


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[tuple[Mesh, BuiltImage]]:
    """A one-node netns mesh holding a fresh image."""
    image = build_image(
        tmp_path / "image",
        name=f"docker.io/library/pmdeploy-{uuid.uuid4().hex[:8]}:1",
        layers=3,
        layer_size=512 * 1024,
    )
    with running_mesh(Mesh(1)) as mesh:
        import_image(mesh.nodes[0], image, tmp_path)
        yield mesh, image


def test_compose_node_is_healthy_pulls_from_a_peer_and_leaves_nothing(
    docker: DockerDaemon,
    peermirror_image: str,
    peer: tuple[Mesh, BuiltImage],
    tmp_path: Path,
) -> None:
    mesh, image = peer
    n1 = mesh.nodes[0]
    assert mesh.lease is not None and mesh.lease.subnet is not None
    # The compose node runs in the host's network namespace: mesh nodes reach it at the
    # bridge's address.
    address = str(host_address(mesh.lease.subnet, BRIDGE_HOST).ip)
    ports = _ports()
    with ExitStack() as stack:
        containerd = stack.enter_context(ContainerdDaemon())
        registries = tmp_path / "registries.yaml"
        registries.write_text(yaml.safe_dump(registries_yaml(["docker.io"])), encoding="utf-8")
        override = tmp_path / "docker-compose.override.yml"
        env = node_environment(ports, address, [n1.discovery_peer_address])
        data = override_data(
            environment=env,
            containerd_socket=Path(containerd.address),
            content_root=containerd.content_root,
            certs_dir=containerd.hosts_dir,
            registries_file=registries,
        )
        override.write_text(yaml.safe_dump(data), encoding="utf-8")
        project = ComposeProject(docker, override)
        stack.callback(_down_and_check, project)
        project.run("up", "--detach", "--no-build")

        inspected = wait_healthy(project)
        for name, info in inspected.items():
            assert_hardened(name, info, peermirror_image)

        # The pinner wrote hosts.toml for the test's containerd: the mirror at the compose
        # registry's port, then 127.0.0.1:9.
        hosts_toml = (containerd.hosts_dir / "docker.io" / "hosts.toml").read_text()
        assert f"http://127.0.0.1:{ports.registry}" in hosts_toml, hosts_toml

        lookup = ["exec", "-T", "registry", "peermirror", "lookup", image.name]
        lookup += ["--config", "/etc/peermirror/node.yaml"]
        found = eventually(lambda: n1.ip in _quiet(project, lookup), ADVERTISE_TIMEOUT, 1.0)
        assert found, f"compose node never found {n1.ip} for {image.name}"

        before = served_to_peers(n1)
        pull = ["images", "pull", "--hosts-dir", str(containerd.hosts_dir), image.name]
        for _ in range(PULL_ATTEMPTS):
            # A pull that misses a blob (a lookup that overran its budget on this busy
            # machine) fails at 127.0.0.1:9; the next attempt fetches only what is missing.
            result = subprocess.run(
                containerd.ctr_argv(pull, "k8s.io"),
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
                timeout=240,
            )
            if result.returncode == 0:
                break
        assert result.returncode == 0, f"pull failed {PULL_ATTEMPTS} times: {result.stderr}"
        for blob in image.blobs:
            path = containerd.blob_path(blob.digest)
            assert path.is_file(), f"{blob.digest} not pulled"
            assert _sha256(path) == blob.digest
        check = containerd.ctr("images", "check")
        assert any(
            line.startswith(image.name) and "complete" in line for line in check.splitlines()
        )
        # The peer served the content: the pull went through the compose node's registry.
        after = served_to_peers(n1)
        assert after["manifest"] > before["manifest"] and after["blob"] > before["blob"]


def _quiet(project: ComposeProject, args: list[str]) -> str:
    argv = [COMPOSE, "--project-name", project.name, *project.files, *args]
    return project.docker.run(argv, cwd=REPO, check=False, timeout=60).stdout


def _sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def assert_hardened(name: str, info: dict[str, Any], image: str) -> None:
    """The container runs as docker-compose.yml says: image, user, no capability, read-only."""
    config, host = info["Config"], info["HostConfig"]
    assert isinstance(config, dict) and isinstance(host, dict)
    assert config["Image"] == image
    # Discovery keeps the image's unprivileged user; the two containerd clients run as root.
    assert config["User"] == ("65532:65532" if name == "discovery" else "0:0"), name
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"] and not host.get("CapAdd")
    assert "no-new-privileges:true" in host["SecurityOpt"]
    assert host["NetworkMode"] == "host"


def _down_and_check(project: ComposeProject) -> None:
    project.run("down", "--volumes", "--timeout", "15")
    assert project.leftovers() == {"container": [], "network": [], "volume": []}
