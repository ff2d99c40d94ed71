"""Runs the registry's HTTP app in the test's own event loop on a free loopback port."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from services.common.config import DiscoverySection, NodeConfig, RegistrySection, TlsSection
from services.common.store.protocol import ContentStore
from services.common.tls import TlsFiles, server_context
from services.registry.app import create_app
from services.registry.context import RegistryApp
from services.registry.inflight.coordinator import Coordinator
from services.registry.service import HttpServer


def write_registries_file(path: Path, mirrors: Sequence[str]) -> Path:
    """A K3s registries.yaml mirroring `mirrors` (host names, or "*")."""
    path.write_text(yaml.safe_dump({"mirrors": {m: {} for m in mirrors}}), encoding="utf-8")
    return path


@dataclass
class RunningRegistry:
    """A registry app listening on 127.0.0.1:`port`."""

    app: RegistryApp
    http: HttpServer

    @property
    def port(self) -> int:
        return self.http.port

    @property
    def url(self) -> str:
        scheme = "http" if self.http.ssl_context is None else "https"
        return f"{scheme}://127.0.0.1:{self.http.port}"


@contextlib.asynccontextmanager
async def serve_registry(
    store: ContentStore,
    work_dir: Path,
    *,
    mirrors: Sequence[str] = ("*",),
    default_registry: str | None = None,
    allow_latest: bool = False,
    filters: Sequence[str] = (),
    discovery: str | None = None,
    tls: TlsFiles | None = None,
    inflight: Coordinator | None = None,
) -> AsyncIterator[RunningRegistry]:
    """Serve `store` (left open for the caller to close) until the block exits. Local content
    only, unless `discovery` (a LocalDiscovery address) is given: then misses go to peers.
    Plain HTTP, unless `tls` is given: then mutual TLS with those files (peers too). With
    `inflight`, misses nobody serves go through that coordinator (shared first pulls)."""
    registries = write_registries_file(work_dir / "registries.yaml", mirrors)
    cfg = NodeConfig(
        registry=RegistrySection(
            host="127.0.0.1",
            port=0,
            grpc_address="127.0.0.1:0",
            default_registry=default_registry,
            allow_latest=allow_latest,
            filters=list(filters),
            registries_file=registries,
            peer_fetch=discovery is not None,
        ),
        discovery=DiscoverySection(local_address=discovery) if discovery else DiscoverySection(),
        tls=(
            TlsSection(enabled=False)
            if tls is None
            else TlsSection(ca_file=tls.ca_file, cert_file=tls.cert_file, key_file=tls.key_file)
        ),
    )
    # Sanic keeps a per-process registry of app names, so each app gets its own.
    app = create_app(
        cfg, name=f"pm_registry_{uuid.uuid4().hex[:12]}", store=store, inflight=inflight
    )
    http = HttpServer(app, "127.0.0.1", 0, None if tls is None else server_context(tls))
    await http.start()
    app.ctx.ready = True
    try:
        yield RunningRegistry(app, http)
    finally:
        app.ctx.ready = False
        await http.stop()
