"""Real clients pull from the registry backed by a real containerd; no upstream is reachable.

- skopeo copies images to an OCI directory (it sends no `ns`, so `default_registry` is set) and
  every copied blob must hash to its digest;
- a second containerd pulls by tag and by digest through `--hosts-dir`, with this registry as the
  docker.io mirror (so it sends `ns=docker.io`) and `server` at http://127.0.0.1:9 where nothing
  listens: the pull can only succeed through the registry.

Both single-arch and multi-arch (index) images.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from services.common.containerd.client import ContainerdClient
from services.common.store.containerd_store import ContainerdStore
from tests.harness.containerd import ContainerdDaemon
from tests.harness.containerd_store_factory import import_image
from tests.harness.images import BuiltImage, build_image
from tests.harness.registry_inproc import RunningRegistry, serve_registry

pytestmark = pytest.mark.containerd

DEAD_SERVER = "http://127.0.0.1:9"
SINGLE = "docker.io/clients/single:1.0"
MULTI = "docker.io/clients/multi:2.0"
MULTI_DOCKER = "docker.io/clients/multi-docker:3.0"
PLATFORMS = ["linux/amd64", "linux/arm64", "linux/arm/v7"]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, BuiltImage]:
    layout = tmp_path_factory.mktemp("client-images")
    return {
        "single": build_image(layout, name=SINGLE, layers=2, layer_size=256 * 1024),
        "multi": build_image(
            layout, name=MULTI, layers=2, layer_size=64 * 1024, platforms=PLATFORMS
        ),
        # A Docker manifest list: skopeo would convert it when writing OCI, containerd keeps it.
        "multi-docker": build_image(
            layout,
            name=MULTI_DOCKER,
            layers=2,
            layer_size=64 * 1024,
            platforms=PLATFORMS,
            media="docker",
        ),
    }


@pytest.fixture(scope="module")
def puller() -> Iterator[ContainerdDaemon]:
    """The second containerd, which pulls through the registry."""
    daemon = ContainerdDaemon()
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
async def registry(
    containerd_daemon: ContainerdDaemon,
    containerd_namespace: str,
    images: dict[str, BuiltImage],
    tmp_path: Path,
) -> AsyncIterator[RunningRegistry]:
    for image in images.values():
        await import_image(containerd_daemon, containerd_namespace, image)
    store = await ContainerdStore.open(containerd_daemon.address, containerd_namespace)
    try:
        async with serve_registry(
            store, tmp_path, mirrors=["docker.io"], default_registry="docker.io"
        ) as running:
            yield running
    finally:
        await store.close()


async def _run(*argv: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, f"{argv} failed: {err.decode()}"
    return out.decode()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


@pytest.mark.parametrize("which", ["single", "multi"])
async def test_skopeo_copies_from_the_registry(
    registry: RunningRegistry, images: dict[str, BuiltImage], which: str, tmp_path: Path
) -> None:
    skopeo = shutil.which("skopeo")
    assert skopeo is not None, "needs the Debian package `skopeo`"
    image = images[which]
    dest = tmp_path / "copied"
    await _run(
        skopeo,
        "--insecure-policy",
        "copy",
        "--quiet",
        "--all",
        "--src-tls-verify=false",
        f"docker://127.0.0.1:{registry.port}/{image.repository}:{image.tag}",
        f"oci:{dest}:{image.tag}",
    )
    blobs = sorted((dest / "blobs" / "sha256").iterdir())
    assert {f"sha256:{p.name}" for p in blobs} == {d.digest for d in image.blobs}
    for blob in blobs:
        assert _sha256_file(blob) == f"sha256:{blob.name}"
    index = json.loads((dest / "index.json").read_text())
    assert [m["digest"] for m in index["manifests"]] == [image.target.digest]


def _write_hosts_toml(hosts_dir: Path, registry: RunningRegistry) -> None:
    host_dir = hosts_dir / "docker.io"
    host_dir.mkdir(parents=True, exist_ok=True)
    (host_dir / "hosts.toml").write_text(
        f'server = "{DEAD_SERVER}"\n\n'
        f'[host."http://127.0.0.1:{registry.port}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
    )


@pytest.mark.parametrize("which", ["single", "multi-docker"])
@pytest.mark.parametrize("by", ["tag", "digest"])
async def test_second_containerd_pulls_through_the_registry(
    registry: RunningRegistry,
    puller: ContainerdDaemon,
    images: dict[str, BuiltImage],
    which: str,
    by: str,
    tmp_path: Path,
    containerd_namespace: str,
) -> None:
    image = images[which]
    hosts_dir = tmp_path / "certs.d"
    _write_hosts_toml(hosts_dir, registry)
    ref = (
        image.name if by == "tag" else f"{image.registry}/{image.repository}@{image.target.digest}"
    )
    namespace = containerd_namespace  # unique per test; on the puller it starts empty
    try:
        await puller.ctr_async(
            "images", "pull", "--all-platforms", "--hosts-dir", str(hosts_dir), ref,
            namespace=namespace,
        )  # fmt: skip
        async with ContainerdClient(puller.address, namespace) as client:
            pulled = await client.get_image(ref)
            assert pulled.target.digest == image.target.digest
            for desc in image.blobs:
                assert (await client.content_info(desc.digest)).size == desc.size
        served = registry.app.ctx.stats
        assert served.bytes_served_local > 0
    finally:
        puller.purge_namespace(namespace)
