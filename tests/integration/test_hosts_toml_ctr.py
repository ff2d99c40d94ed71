"""Generated hosts.toml on a real containerd: `ctr images pull --hosts-dir` goes through the mirror.

A Go `docker-registry` on a loopback port plays the mirror of docker.io. The embedded mirror is
configured on a loopback port where nothing listens, and `server` is http://127.0.0.1:9, so a pull
can only succeed through the test registry, and nothing ever leaves the machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from services.pinner.hosts_toml import HostsOptions
from services.pinner.hosts_writer import write_containerd_config
from tests.harness.containerd import ContainerdDaemon
from tests.harness.ctr_pull import DEAD_SERVER, ctr_pull, hosts_tried, push
from tests.harness.service_procs import free_port
from tests.harness.upstream import DistributionRegistry, loopback_registry

pytestmark = pytest.mark.containerd

START_TIMEOUT_S = 15.0


@pytest.fixture
def test_registry(tmp_path: Path) -> Iterator[DistributionRegistry]:
    with loopback_registry(tmp_path / "registry") as registry:
        yield registry


def request_uris(registry: DistributionRegistry) -> list[str]:
    return [str(r["http.request.uri"]) for r in registry.requests()]


def render(tmp_path: Path, registry: DistributionRegistry, dead_mirror_port: int) -> Path:
    reg_file = tmp_path / "registries.yaml"
    reg_file.write_text(
        "mirrors:\n"
        "  docker.io:\n"
        f"    endpoint: ['http://{registry.hostport}']\n"
        # Upstream containerd ignores rewrite tables: the file must still be accepted.
        "    rewrite: {'^nothing/(.*)': 'never/$1'}\n"
    )
    out = tmp_path / "certs.d"
    opts = HostsOptions(mirror_port=dead_mirror_port, mirror_tls=False, server_override=DEAD_SERVER)
    paths = write_containerd_config(reg_file, out, opts)
    assert out / "docker.io" / "hosts.toml" in paths
    return out


def test_pull_goes_through_generated_mirror_config(
    containerd_daemon: ContainerdDaemon,
    containerd_namespace: str,
    test_registry: DistributionRegistry,
    tmp_path: Path,
) -> None:
    digest = push(tmp_path, test_registry, "library/test:1.0")
    dead_mirror = free_port()
    hosts_dir = render(tmp_path, test_registry, dead_mirror)

    result = ctr_pull(
        containerd_daemon, containerd_namespace, hosts_dir, "docker.io/library/test:1.0"
    )
    assert result.returncode == 0, result.stderr
    listing = containerd_daemon.ctr("images", "list", namespace=containerd_namespace)
    assert "docker.io/library/test:1.0" in listing and digest in listing
    # The embedded mirror (first) was tried and refused; then the test registry answered.
    assert hosts_tried(result.stderr) == [f"127.0.0.1:{dead_mirror}"]
    requests = request_uris(test_registry)
    assert "/v2/library/test/manifests/1.0?ns=docker.io" in requests, requests


def test_server_is_tried_last(
    containerd_daemon: ContainerdDaemon,
    containerd_namespace: str,
    test_registry: DistributionRegistry,
    tmp_path: Path,
) -> None:
    dead_mirror = free_port()
    hosts_dir = render(tmp_path, test_registry, dead_mirror)

    result = ctr_pull(
        containerd_daemon, containerd_namespace, hosts_dir, "docker.io/library/absent:1.0"
    )
    assert result.returncode != 0
    # Mirror first, then the test registry (404), and the dead server last.
    assert hosts_tried(result.stderr) == [
        f"127.0.0.1:{dead_mirror}",
        test_registry.hostport,
        "127.0.0.1:9",
    ]
    assert "/v2/library/absent/manifests/1.0?ns=docker.io" in request_uris(test_registry)
