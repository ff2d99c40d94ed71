"""containerd pulls through the registry over mutual TLS, configured by the pinner's hosts.toml.

The registry serves an image from its own store over TLS with the node certificate; the generated
hosts.toml names the cluster CA (`ca`) and the node's client pair (`client`). `server` is
http://127.0.0.1:9, where nothing listens, so a pull succeeds only through the mTLS mirror.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.tls import TlsFiles
from services.pinner.hosts_toml import HostsOptions
from services.pinner.hosts_writer import write_containerd_config
from tests.harness.containerd import ContainerdDaemon, ContainerdError
from tests.harness.images import BuiltImage, build_image
from tests.harness.registry_inproc import RunningRegistry
from tests.integration.security.conftest import ClusterPki

pytestmark = pytest.mark.containerd

IMAGE = "docker.io/secure/app:1.0"
DEAD_SERVER = "http://127.0.0.1:9"


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    return build_image(tmp_path_factory.mktemp("image"), name=IMAGE, layers=2)


def _hosts_dir(tmp_path: Path, registry: RunningRegistry, files: TlsFiles, client: bool) -> Path:
    registries = tmp_path / "registries.yaml"
    registries.write_text("mirrors:\n  docker.io: {}\n", encoding="utf-8")
    out = tmp_path / ("certs.d" if client else "certs.d-noclient")
    opts = HostsOptions(
        mirror_port=registry.port,
        mirror_tls=True,
        ca_file=str(files.ca_file),
        client_cert_file=str(files.cert_file) if client else None,
        client_key_file=str(files.key_file) if client else None,
        server_override=DEAD_SERVER,
    )
    write_containerd_config(registries, out, opts)
    text = (out / "docker.io" / "hosts.toml").read_text()
    assert f"https://127.0.0.1:{registry.port}" in text
    assert ("client" in text) is client
    return out


async def test_containerd_pulls_through_the_mirror_over_mutual_tls(
    containerd_daemon: ContainerdDaemon,
    containerd_namespace: str,
    registry: RunningRegistry,
    cluster: ClusterPki,
    image: BuiltImage,
    tmp_path: Path,
) -> None:
    hosts = _hosts_dir(tmp_path, registry, cluster.node, client=True)
    await containerd_daemon.ctr_async(
        "images", "pull", "--hosts-dir", str(hosts), IMAGE, namespace=containerd_namespace
    )
    listing = containerd_daemon.ctr("images", "list", "-q", namespace=containerd_namespace)
    assert IMAGE in listing.split()
    assert registry.app.ctx.stats.bytes_served_local >= sum(d.size for d in image.blobs)


async def test_containerd_without_the_client_certificate_is_refused(
    containerd_daemon: ContainerdDaemon,
    containerd_namespace: str,
    registry: RunningRegistry,
    cluster: ClusterPki,
    tmp_path: Path,
) -> None:
    hosts = _hosts_dir(tmp_path, registry, cluster.node, client=False)
    with pytest.raises(ContainerdError):
        await containerd_daemon.ctr_async(
            "images", "pull", "--hosts-dir", str(hosts), IMAGE, namespace=containerd_namespace
        )
    assert registry.app.ctx.stats.bytes_served_local == 0
