"""The registry port over mutual TLS: only clients with a valid cluster certificate are answered."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from services.common.store.oci_layout import OciLayoutStore
from tests.harness.images import BuiltImage, build_image
from tests.harness.registry_inproc import RunningRegistry, serve_registry
from tests.integration.security.conftest import ClusterPki

IMAGE = "docker.io/library/secure:1.0"
TIMEOUT = aiohttp.ClientTimeout(total=10)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    # A layer of several store chunks (1 MiB), so a body over TLS is sent in pieces.
    return build_image(
        tmp_path_factory.mktemp("image"), name=IMAGE, layers=1, layer_size=3 * 1024 * 1024 + 5
    )


@pytest.fixture
async def registry(
    cluster: ClusterPki, image: BuiltImage, tmp_path: Path
) -> AsyncIterator[RunningRegistry]:
    store = OciLayoutStore(tmp_path / "layout", create=True)
    image.write_oci_layout(tmp_path / "layout")
    try:
        async with serve_registry(store, tmp_path, mirrors=["docker.io"], tls=cluster.node) as r:
            yield r
    finally:
        await store.close()


async def _get(
    url: str, ctx: ssl.SSLContext | bool, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    connector = aiohttp.TCPConnector(ssl=ctx, force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=TIMEOUT, trust_env=False) as session,
        session.get(url, headers=headers) as resp,
    ):
        return resp.status, await resp.read()


async def test_a_node_certificate_of_the_cluster_ca_is_served(
    registry: RunningRegistry, cluster: ClusterPki, image: BuiltImage
) -> None:
    assert registry.url.startswith("https://")
    status, _ = await _get(f"{registry.url}/v2/", cluster.context("peer"))
    assert status == 200
    manifest = f"{registry.url}/v2/library/secure/manifests/1.0?ns=docker.io"
    status, body = await _get(manifest, cluster.context("peer"))
    assert status == 200
    assert body == image.read_blob(image.target.digest)


async def test_blobs_over_tls_arrive_whole_and_by_range(
    registry: RunningRegistry,
    cluster: ClusterPki,
    image: BuiltImage,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # loop.sendfile on a TLS transport falls back to 16 KiB reads, one thread-pool round trip
    # each (0.07 GB/s): TLS bodies must take the stream path.
    async def no_sendfile(*args: object, **kwargs: object) -> int:
        raise AssertionError("loop.sendfile used on a TLS connection")

    monkeypatch.setattr(asyncio.get_running_loop(), "sendfile", no_sendfile)
    layer = image.platforms[0].layers[0].descriptor.digest
    data = image.read_blob(layer)
    url = f"{registry.url}/v2/library/secure/blobs/{layer}?ns=docker.io"
    status, body = await _get(url, cluster.context("peer"))
    assert (status, body) == (200, data)
    first, last = 1024 * 1024 - 3, 2 * 1024 * 1024 + 9  # across chunk boundaries
    status, body = await _get(url, cluster.context("peer"), {"Range": f"bytes={first}-{last}"})
    assert (status, body) == (206, data[first : last + 1])


@pytest.mark.parametrize("which", ["no certificate", "foreign", "expired"])
async def test_clients_without_a_valid_certificate_are_refused(
    registry: RunningRegistry, cluster: ClusterPki, which: str
) -> None:
    ctx = cluster.no_cert_context() if which == "no certificate" else cluster.context(which)
    # The handshake fails: no status line, let alone content, reaches the client.
    with pytest.raises(aiohttp.ClientError):
        await _get(f"{registry.url}/v2/library/secure/manifests/1.0?ns=docker.io", ctx)


async def test_plain_http_gets_no_answer_on_the_tls_port(registry: RunningRegistry) -> None:
    plain = registry.url.replace("https://", "http://")
    with pytest.raises(aiohttp.ClientError):
        await _get(f"{plain}/v2/", False)


async def test_a_server_certificate_from_another_ca_is_not_trusted(
    cluster: ClusterPki, image: BuiltImage, tmp_path: Path
) -> None:
    # The foreign set trusts the cluster CA, so a registry serving the foreign certificate is
    # refused by a client of the cluster: node-to-node fetches verify the peer too.
    store = OciLayoutStore(tmp_path / "layout", create=True)
    try:
        async with serve_registry(store, tmp_path, tls=cluster.foreign) as impostor:
            with pytest.raises(aiohttp.ClientError):
                await _get(f"{impostor.url}/v2/", cluster.context("node"))
    finally:
        await store.close()
