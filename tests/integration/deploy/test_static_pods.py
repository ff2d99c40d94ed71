"""The K3s static pods for real, without kubelet: each container of deploy/k3s/*.yaml runs from
the image under containerd with runc, answers the probes its manifest declares, and a pull goes
through the node's mirror to a peer.

The "K3s node" is a network namespace on a netns mesh bridge (so the manifests' fixed ports are
its own), next to a one-node mesh over mutual TLS holding an image. The pods' hostPath volumes
map to a directory standing in for the node's root, except the containerd socket, content store
and certs.d, which are the node's containerd (started by the harness) as they are K3s's on a real
node. The node config is deploy/k3s/node.yaml with what a user adds (a bootstrap peer) and what
this containerd needs (it is upstream containerd 1.6, not K3s's).
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common.config import load_config
from services.common.pki import issue_node, write_node
from tests.harness import netns
from tests.harness.containerd import ContainerdDaemon
from tests.harness.fixtures_mesh import running_mesh
from tests.harness.images import BuiltImage, build_image
from tests.harness.mesh import Mesh, NetnsHost, deep_merge
from tests.harness.mesh_p2p import import_image, served_to_peers
from tests.harness.wait import eventually, wait_for
from tests.integration.deploy.conftest import REPO
from tests.integration.deploy.docker_daemon import DockerDaemon
from tests.integration.deploy.podspec import Container, Volume, containers
from tests.integration.deploy.static_pods import NAMESPACE, PodRunner, RunningContainer

pytestmark = [pytest.mark.slow, pytest.mark.containerd, pytest.mark.timeout(900)]

K3S = REPO / "deploy" / "k3s"
# The manifests and node config of each kind of K3s node (deploy/k3s/README.md, step 6).
NODE_KINDS = {
    "agent": ("node.yaml", ("discovery.yaml", "registry.yaml", "pinner.yaml")),
    "server": ("node-server.yaml", ("discovery.yaml", "registry-server.yaml", "pinner.yaml")),
}
# K3s paths the pods mount that are the node's containerd itself.
CONTAINERD_SOCKET = "/run/k3s/containerd/containerd.sock"
CONTENT_ROOT = "/var/lib/rancher/k3s/agent/containerd/io.containerd.content.v1.content"
CERTS_DIR = "/var/lib/rancher/k3s/agent/etc/containerd/certs.d"
TLS_DIR = "/var/lib/peermirror/tls"
NOWHERE = "http://127.0.0.1:9"
READY_TIMEOUT = 120.0
ADVERTISE_TIMEOUT = 90.0
PULL_ATTEMPTS = 3


def node_config(name: str, bootstrap: str) -> dict[str, Any]:
    """deploy/k3s/<name> plus a bootstrap peer (every real cluster names one) and the
    containerd this test runs (upstream 1.6: hosts.toml needs `server` to exclude upstream)."""
    shipped = yaml.safe_load((K3S / name).read_text(encoding="utf-8"))
    extra = {
        "discovery": {"bootstrap_peers": [bootstrap]},
        "pinner": {"containerd_flavour": "upstream", "containerd_version": "1.6"},
    }
    return deep_merge(shipped, extra)


class FakeHostRoot:
    """Where each hostPath of the manifests lives on this machine, created as its type says."""

    def __init__(self, root: Path, containerd: ContainerdDaemon) -> None:
        self.root = root
        self.fixed = {
            CONTAINERD_SOCKET: Path(containerd.address),
            CONTENT_ROOT: containerd.content_root,
            CERTS_DIR: containerd.hosts_dir,
        }

    def path(self, host_path: str) -> Path:
        return self.fixed.get(host_path, self.root / host_path.lstrip("/"))

    def __call__(self, volume: Volume) -> str:
        assert volume.host_path is not None
        path = self.path(volume.host_path)
        kind = volume.host_path_type
        if kind == "DirectoryOrCreate":
            path.mkdir(parents=True, exist_ok=True)
        elif kind == "FileOrCreate":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        ok = {
            "Directory": path.is_dir(),
            "DirectoryOrCreate": path.is_dir(),
            "File": path.is_file(),
            "FileOrCreate": path.is_file(),
            "Socket": path.is_socket(),
        }.get(kind, path.exists())
        # kubelet refuses to start a pod whose hostPath is missing or of the wrong type.
        assert ok, f"hostPath {volume.host_path} ({kind}) missing at {path}"
        return str(path)


def _write(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[tuple[Mesh, BuiltImage]]:
    """A one-node mesh over mutual TLS holding a fresh image."""
    image = build_image(
        tmp_path / "image",
        name=f"docker.io/library/pmpod-{uuid.uuid4().hex[:8]}:1",
        layers=3,
        layer_size=512 * 1024,
    )
    with running_mesh(Mesh(1, tls=True)) as mesh:
        import_image(mesh.nodes[0], image, tmp_path)
        yield mesh, image


@pytest.mark.parametrize("kind", sorted(NODE_KINDS))
def test_k3s_static_pods_run_answer_their_probes_and_pull_from_a_peer(
    docker: DockerDaemon,
    peermirror_image: str,
    peer: tuple[Mesh, BuiltImage],
    tmp_path: Path,
    kind: str,
) -> None:
    mesh, image = peer
    n1 = mesh.nodes[0]
    assert mesh.ca is not None
    k3s: NetnsHost = mesh.add_host("k3s")
    config_name, manifests = NODE_KINDS[kind]
    pods = [c for f in manifests for c in containers(yaml.safe_load((K3S / f).read_text()))]
    assert {c.image for c in pods} == {peermirror_image}

    with ExitStack() as stack:
        node_containerd = stack.enter_context(ContainerdDaemon())
        host = FakeHostRoot(tmp_path / "host", node_containerd)
        # README step 1: the image, saved by docker, imported into the node's containerd.
        archive = tmp_path / "peermirror.tar"
        docker.docker("save", "--output", str(archive), peermirror_image, timeout=300)
        node_containerd.ctr("images", "import", str(archive), namespace=NAMESPACE)
        archive.unlink()
        image_config = docker.inspect("image", peermirror_image)
        assert image_config is not None

        # README steps 2-4: certificates, node config, registries.yaml (and K3s's config.yaml).
        tls = host.path(TLS_DIR)
        tls.mkdir(parents=True, mode=0o700)
        write_node(tls, issue_node(mesh.ca, "k3s", k3s.ip), mesh.ca.cert)
        config = host.path("/etc/peermirror/node.yaml")
        _write(config, node_config(config_name, n1.discovery_peer_address))
        _write(
            host.path("/etc/rancher/k3s/registries.yaml"),
            {"mirrors": {"docker.io": {"endpoint": [NOWHERE]}}},
        )
        _write(
            host.path("/etc/rancher/k3s/config.yaml"), {"disable-default-registry-endpoint": True}
        )
        port = load_config(config, env={}).registry.port

        runner = PodRunner(
            node_containerd,
            tmp_path / "pods",
            f"/var/run/netns/{k3s.ns}",
            image_config["Config"],
            host,
        )
        stack.callback(_stop, runner)
        started = [runner.start(c) for c in pods]
        wait_probes(runner, started)

        # The registry's HTTP probes, asked directly with the node's certificate.
        for path in ("/livez", "/readyz"):
            curl = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"]
            curl += [str(tls / "ca.crt"), "--cert", str(tls / "node.crt")]
            curl += ["--key", str(tls / "node.key"), f"https://127.0.0.1:{port}{path}"]
            assert k3s.exec(curl).stdout == "200", path

        hosts_toml = (node_containerd.hosts_dir / "docker.io" / "hosts.toml").read_text()
        assert f"https://127.0.0.1:{port}" in hosts_toml and NOWHERE in hosts_toml, hosts_toml
        registry = next(r for r in started if r.container.name == "registry")
        # A server's registry listens on 6445 (K3s's API server owns 6443 there).
        assert port == {"agent": 6443, "server": 6445}[kind]
        lookup = ["peermirror", "lookup", image.name, "--config", "/etc/peermirror/node.yaml"]
        found = eventually(lambda: runner.exec(registry, lookup) == 0, ADVERTISE_TIMEOUT, 1.0)
        assert found, f"the node never found a provider of {image.name}"

        before = served_to_peers(n1)
        result = pull(k3s, node_containerd, image.name, tls)
        assert result.returncode == 0, f"pull failed {PULL_ATTEMPTS} times: {result.stderr}"
        for blob in image.blobs:
            data = node_containerd.blob_path(blob.digest).read_bytes()
            assert "sha256:" + hashlib.sha256(data).hexdigest() == blob.digest
        after = served_to_peers(n1)
        assert after["manifest"] > before["manifest"] and after["blob"] > before["blob"]
        for running in started:
            assert runner.task_status(running) == "RUNNING", running.log_tail()


def wait_probes(runner: PodRunner, started: list[RunningContainer]) -> None:
    """Every container's readiness and liveness exec probe exits 0 (kubelet's verdicts)."""
    deadline = time.monotonic() + READY_TIMEOUT
    for running in started:
        c: Container = running.container
        assert c.readiness is not None and c.liveness is not None, c.name
        for probe in (c.readiness, c.liveness):
            wait_for(
                f"{running.id}: {probe} passing",
                functools.partial(runner.exec_ok, running, probe),
                max(0.0, deadline - time.monotonic()),
                1.0,
                gone=functools.partial(task_gone, runner, running),
                detail=running.log_tail,
            )


def task_gone(runner: PodRunner, running: RunningContainer) -> str | None:
    """Why `running`'s probes can never pass any more (its task is not running), or None."""
    status = runner.task_status(running)
    return None if status == "RUNNING" else f"task {status}:\n{running.log_tail()}"


def pull(
    k3s: NetnsHost, containerd: ContainerdDaemon, ref: str, tls: Path
) -> subprocess.CompletedProcess[str]:
    """`ctr images pull` with the node's certs.d, from inside the node's network namespace.

    hosts.toml names the TLS files at their node paths (/var/lib/peermirror/tls, where a real
    node keeps them); a private mount namespace puts this test's files there for ctr only.
    """
    ctr = containerd.ctr_argv(
        ["images", "pull", "--hosts-dir", str(containerd.hosts_dir), ref], NAMESPACE
    )
    script = (
        "set -e; mount --make-rprivate /; mount -t tmpfs tmpfs /var/lib;"
        f' mkdir -p {TLS_DIR}; mount --bind {tls} {TLS_DIR}; exec "$@"'
    )
    argv = netns.exec_argv(k3s.ns, ["unshare", "--mount", "sh", "-c", script, "sh", *ctr])
    result = subprocess.CompletedProcess[str](argv, 1, "", "")
    for _ in range(PULL_ATTEMPTS):
        # A pull that misses a blob on this busy machine fails at 127.0.0.1:9; the next
        # attempt fetches only what is missing.
        result = subprocess.run(
            argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=240
        )
        if result.returncode == 0:
            break
    return result


def _stop(runner: PodRunner) -> None:
    problems = runner.stop_all()
    assert not problems, problems
