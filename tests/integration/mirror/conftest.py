"""A small loopback cluster for mirror tests: peers serving one image, a fake discovery naming
them (through fault proxies), and a helper to start the mirroring registry under test."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from services.common.config import DiscoverySection, NodeConfig, RegistrySection, TlsSection
from services.common.store.oci_layout import OciLayoutStore
from services.registry.app import create_app
from services.registry.service import HttpServer
from tests.harness.fake_discovery import FakeDiscovery
from tests.harness.fault_proxy import FaultProxy
from tests.harness.images import BuiltImage, build_image
from tests.harness.registry_inproc import RunningRegistry, serve_registry, write_registries_file

IMAGE = "docker.io/library/app:1.0"
PEERS = 3
# Client-side bound on every test request: a hang fails the test instead of stalling it.
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=20)
# Bound on waiting for something another task's I/O makes true (a quarantine, a cancel).
SETTLE_S = 10.0


@contextlib.asynccontextmanager
async def mirror_node(
    work_dir: Path, discovery: str, *, mirrors: Sequence[str] = ("*",), **registry: Any
) -> AsyncIterator[RunningRegistry]:
    """A registry with an empty store in `work_dir` (existing) whose misses go to the peers
    `discovery` names; `registry` overrides RegistrySection fields (budgets, limits)."""
    store = OciLayoutStore(work_dir / "layout", create=True)
    cfg = NodeConfig(
        registry=RegistrySection(
            host="127.0.0.1",
            port=0,
            grpc_address="127.0.0.1:0",
            registries_file=write_registries_file(work_dir / "registries.yaml", mirrors),
            **registry,
        ),
        discovery=DiscoverySection(local_address=discovery),
        tls=TlsSection(enabled=False),
    )
    app = create_app(cfg, name=f"pm_mirror_{uuid.uuid4().hex[:12]}", store=store)
    http = HttpServer(app, "127.0.0.1", 0)
    await http.start()
    app.ctx.ready = True
    try:
        yield RunningRegistry(app, http)
    finally:
        await http.stop()
        await store.close()


@dataclass
class Cluster:
    image: BuiltImage
    peers: list[RunningRegistry]
    proxies: list[FaultProxy]
    discovery: FakeDiscovery
    session: aiohttp.ClientSession
    work_dir: Path

    @property
    def layer(self) -> str:
        return self.image.platforms[0].layers[0].descriptor.digest

    @property
    def manifest(self) -> str:
        return self.image.target.digest

    def keys(self) -> list[str]:
        return [IMAGE, *(d.digest for d in self.image.blobs)]

    def quarantined(self, node: RunningRegistry, proxy: FaultProxy) -> bool:
        """Whether `node`'s mirror keeps the node behind `proxy` out of its relays."""
        mirror = node.app.ctx.mirror
        assert mirror is not None
        return any(p.port == proxy.port and mirror.is_quarantined(p) for p in mirror.book.known())

    def provide(self, *proxies: FaultProxy) -> None:
        """Every key of the image is provided by `proxies`, in that order."""
        self.discovery.providers.clear()
        self.discovery.provide(self.keys(), *(p.contact for p in proxies))

    def mirror(
        self, name: str = "mirror", **registry: Any
    ) -> contextlib.AbstractAsyncContextManager[RunningRegistry]:
        work_dir = self.work_dir / name
        work_dir.mkdir()
        return mirror_node(work_dir, self.discovery.address, **registry)

    async def get(
        self,
        node: RunningRegistry,
        path: str,
        *,
        method: str = "GET",
        ns: str = "docker.io",
        **headers: str,
    ) -> tuple[int, dict[str, str], bytes]:
        async with self.session.request(
            method, f"{node.url}/v2/{path}", params={"ns": ns}, headers=headers
        ) as resp:
            return resp.status, dict(resp.headers), await resp.read()


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    layout = tmp_path / "peer-layout"
    # One 3 MiB layer: several relay chunks, so truncation and corruption land mid-body.
    image = build_image(layout, name=IMAGE, layers=1, layer_size=3 * 1024 * 1024, cheap_data=True)
    async with contextlib.AsyncExitStack() as stack:
        peers: list[RunningRegistry] = []
        proxies: list[FaultProxy] = []
        for i in range(PEERS):
            store = await stack.enter_async_context(OciLayoutStore(layout))
            work = tmp_path / f"peer{i}"
            work.mkdir()
            peer = await stack.enter_async_context(serve_registry(store, work))
            peers.append(peer)
            proxies.append(await stack.enter_async_context(FaultProxy(peer.port)))
        discovery = await stack.enter_async_context(FakeDiscovery())
        session = await stack.enter_async_context(aiohttp.ClientSession(timeout=CLIENT_TIMEOUT))
        cluster = Cluster(image, peers, proxies, discovery, session, tmp_path)
        cluster.provide(*proxies)
        yield cluster
