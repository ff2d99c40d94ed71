"""A cluster PKI for the security tests: good nodes, and the certificates that must be refused."""

from __future__ import annotations

import asyncio
import datetime
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from services.common import pki
from services.common.store.oci_layout import OciLayoutStore
from services.common.tls import TlsFiles, client_context
from tests.harness.images import BuiltImage
from tests.harness.registry_inproc import RunningRegistry, serve_registry

LOOPBACK = "127.0.0.1"
# An address no test node calls from: a certificate naming it is someone else's identity.
OTHER_IP = "127.0.0.3"


@dataclass(frozen=True)
class ClusterPki:
    """Files of the cluster CA's nodes and of the clients that must be refused.

    Every set trusts the cluster CA (`ca_file`), so the only thing wrong with a refused client
    is its own certificate.
    """

    ca: pki.Issued
    node: TlsFiles  # 127.0.0.1, from the cluster CA: the node under test
    peer: TlsFiles  # 127.0.0.1, from the cluster CA: another honest node
    other: TlsFiles  # 127.0.0.1, from the cluster CA: a third node (authenticated, maybe hostile)
    foreign: TlsFiles  # 127.0.0.1, signed by another CA
    expired: TlsFiles  # 127.0.0.1, from the cluster CA, validity ended yesterday
    rogue: TlsFiles  # from the cluster CA but naming OTHER_IP: authenticated, wrong address

    def no_cert_context(self) -> ssl.SSLContext:
        """A client context trusting the cluster CA but presenting no certificate."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(self.node.ca_file))
        return ctx

    def context(self, which: str) -> ssl.SSLContext:
        """Client context presenting the certificate `which` names."""
        files: TlsFiles = getattr(self, which)
        return client_context(files)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> ClusterPki:
    root = tmp_path_factory.mktemp("pki")
    ca = pki.create_ca()
    other_ca = pki.create_ca("some other CA")
    yesterday = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=2)
    issued = {
        "node": pki.issue_node(ca, "node-a", LOOPBACK),
        "peer": pki.issue_node(ca, "node-b", LOOPBACK),
        "other": pki.issue_node(ca, "node-c", LOOPBACK),
        "foreign": pki.issue_node(other_ca, "node-x", LOOPBACK),
        "expired": pki.issue_node(
            ca, "node-old", LOOPBACK, not_before=yesterday, valid_for=datetime.timedelta(days=1)
        ),
        "rogue": pki.issue_node(ca, "node-rogue", OTHER_IP),
    }
    files: dict[str, TlsFiles] = {}
    for name, cert in issued.items():
        pki.write_node(root / name, cert, ca.cert)
        files[name] = TlsFiles.in_directory(root / name)
    return ClusterPki(ca=ca, **files)


@dataclass
class ConnectionRecorder:
    """A loopback TCP listener that only counts the connections made to it."""

    host: str = LOOPBACK
    port: int = 0
    connections: int = 0
    _server: asyncio.Server | None = field(default=None, repr=False)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.close()

    async def start(self) -> None:
        sock = socket.create_server((self.host, 0))
        self._server = await asyncio.start_server(self._accept, sock=sock)
        self.port = int(sock.getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def __aenter__(self) -> ConnectionRecorder:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


@pytest.fixture
async def recorder() -> AsyncIterator[ConnectionRecorder]:
    """Counts connections to a loopback address no node has (OTHER_IP)."""
    async with ConnectionRecorder(host=OTHER_IP) as rec:
        yield rec


@pytest.fixture
async def registry(
    cluster: ClusterPki, image: BuiltImage, tmp_path: Path
) -> AsyncIterator[RunningRegistry]:
    """The registry under test over mutual TLS with the node certificate, serving the module's
    `image` from an OCI layout."""
    store = OciLayoutStore(tmp_path / "layout", create=True)
    image.write_oci_layout(tmp_path / "layout")
    try:
        async with serve_registry(store, tmp_path, mirrors=["docker.io"], tls=cluster.node) as r:
            yield r
    finally:
        await store.close()
