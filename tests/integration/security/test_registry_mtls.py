"""The registry port over mutual TLS: only clients with a valid cluster certificate are answered."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from sanic.server.protocols.http_protocol import HttpProtocol

from services.common.store.oci_layout import OciLayoutStore
from services.registry.stats import RequestKind, Result
from tests.harness.images import BuiltImage, build_image
from tests.harness.registry_inproc import RunningRegistry, serve_registry
from tests.harness.wait import wait_for
from tests.integration.security.conftest import ClusterPki

IMAGE = "docker.io/library/secure:1.0"
TIMEOUT = aiohttp.ClientTimeout(total=10)
# Kernel socket buffers small enough that a 48 KiB answer cannot fit in them.
SMALL_BUFFER = 4096


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    # A layer of several store chunks (1 MiB), so a body over TLS is sent in pieces.
    return build_image(
        tmp_path_factory.mktemp("image"), name=IMAGE, layers=1, layer_size=3 * 1024 * 1024 + 5
    )


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


def _get_then_read_late(
    port: int, target: str, ctx: ssl.SSLContext, answered: Callable[[], bool]
) -> tuple[bytes, bytes]:
    """GET `target` asking the server to close after its answer, through a small receive
    buffer, and read nothing until `answered()` (the server is done with the request: what
    the buffers do not hold waits in its transport); returns the head and the body bytes."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
    raw.settimeout(10)
    raw.connect(("127.0.0.1", port))
    with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        sock.sendall(
            f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode()
        )
        wait_for("the registry done with the answer", answered, 10.0, 0.01)
        received = bytearray()
        while piece := sock.recv(64 * 1024):
            received += piece
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    return head, body


async def test_an_answer_still_queued_when_the_connection_closes_is_sent_whole(
    cluster: ClusterPki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The client asks the registry to close after its answer and reads late through small
    # kernel buffers, so part of the answer still waits in asyncio's socket transport when
    # the registry closes. Sanic aborted such a connection at once (a TLS transport reports
    # only what its TLS layer holds): the body ended short. Between mesh nodes this cut 5
    # relayed 256 MiB GETs in 75.
    made = HttpProtocol.connection_made

    def small_send_buffer(self: HttpProtocol, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
        made(self, transport)  # type: ignore[no-untyped-call]

    monkeypatch.setattr(HttpProtocol, "connection_made", small_send_buffer)
    small = build_image(tmp_path / "image", name=IMAGE, layers=1, layer_size=48 * 1024)
    store = OciLayoutStore(tmp_path / "layout", create=True)
    small.write_oci_layout(tmp_path / "layout")
    layer = small.platforms[0].layers[0].descriptor.digest
    target = f"/v2/library/secure/blobs/{layer}?ns=docker.io"
    try:
        async with serve_registry(store, tmp_path, mirrors=["docker.io"], tls=cluster.node) as r:
            stats = r.app.ctx.stats
            head, body = await asyncio.to_thread(
                _get_then_read_late,
                r.port,
                target,
                cluster.context("peer"),
                lambda: sum(stats.count(RequestKind.BLOB, result) for result in Result) == 1,
            )
    finally:
        await store.close()
    assert head.startswith(b"HTTP/1.1 200")
    assert len(body) == len(small.read_blob(layer))
    assert body == small.read_blob(layer)


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
