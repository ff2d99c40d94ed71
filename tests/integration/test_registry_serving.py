"""Registry behaviour beyond conformance, over real HTTP: policy, peer requests, streaming from a
store without files, cache invalidation by store events, store outages and gRPC introspection."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest

from services.common.config import NodeConfig, RegistrySection, StoreSection, TlsSection
from services.common.genproto.peermirror.registry.v1 import introspection_pb2 as pb
from services.common.genproto.peermirror.registry.v1 import introspection_pb2_grpc as pb_grpc
from services.common.grpc_server import GrpcServer
from services.common.oci.media_types import OCI_INDEX, OCI_MANIFEST
from services.common.store.memory import MemoryStore
from services.common.store.oci_layout import OciLayoutStore
from services.common.store.protocol import ContentStore, Descriptor
from services.registry.app import create_app
from services.registry.headers import PEER_HEADER
from services.registry.introspection import register
from services.registry.service import HttpServer
from services.registry.stats import RequestKind, Result
from tests.harness.registry_inproc import RunningRegistry, serve_registry, write_registries_file
from tests.harness.wait import wait_until

MiB = 1 << 20


def _json(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


@dataclass
class Content:
    store: MemoryStore
    manifest: Descriptor
    layer: Descriptor
    layer_bytes: bytes


def _fill(
    store: MemoryStore, name: str = "docker.io/library/app:1.0", seed: bytes = b""
) -> Content:
    layer_bytes = hashlib.sha256(seed + b"layer").digest() * (3 * MiB // 32 + 7)
    layer = store.add_blob(layer_bytes)
    config = store.add_blob(_json({"architecture": "amd64", "os": "linux", "seed": seed.hex()}))
    body = _json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "x", "digest": config, "size": 1},
            "layers": [{"mediaType": "y", "digest": layer, "size": len(layer_bytes)}],
        }
    )
    manifest = Descriptor(store.add_blob(body), len(body), OCI_MANIFEST)
    store.set_image(name, manifest)
    return Content(store, manifest, Descriptor(layer, len(layer_bytes)), layer_bytes)


@dataclass
class Env:
    registry: RunningRegistry
    session: aiohttp.ClientSession
    content: Content

    async def get(
        self, path: str, *, method: str = "GET", ns: str | None = "docker.io", **headers: str
    ) -> tuple[int, dict[str, str], bytes]:
        params = {"ns": ns} if ns is not None else {}
        async with self.session.request(
            method, self.registry.url + path, params=params, headers=headers
        ) as resp:
            return resp.status, dict(resp.headers), await resp.read()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    store = MemoryStore(read_chunk=256 * 1024)
    content = _fill(store)
    async with (
        serve_registry(store, tmp_path, mirrors=["docker.io", "ghcr.io"]) as registry,
        aiohttp.ClientSession() as session,
    ):
        yield Env(registry, session, content)
    await store.close()


def _codes(body: bytes) -> list[str]:
    return [e["code"] for e in json.loads(body)["errors"]]


async def test_blob_streams_from_a_store_without_files(env: Env) -> None:
    path = f"/v2/library/app/blobs/{env.content.layer.digest}"
    status, headers, body = await env.get(path)
    assert status == 200
    assert body == env.content.layer_bytes
    assert headers["Content-Length"] == str(len(env.content.layer_bytes))
    status, headers, body = await env.get(path, Range="bytes=300000-")
    assert status == 206
    assert body == env.content.layer_bytes[300000:]


async def test_head_manifest_carries_the_get_headers(env: Env) -> None:
    path = "/v2/library/app/manifests/1.0"
    _, got, body = await env.get(path)
    status, head, head_body = await env.get(path, method="HEAD")
    assert (status, head_body) == (200, b"")
    for name in ("Content-Type", "Content-Length", "Docker-Content-Digest", "OCI-Namespace"):
        assert head[name] == got[name]
    assert int(head["Content-Length"]) == len(body)


async def test_policy_refusals_are_404(env: Env) -> None:
    status, _, body = await env.get("/v2/library/app/manifests/1.0", ns="quay.io")
    assert (status, _codes(body)) == (404, ["NAME_UNKNOWN"])
    status, _, body = await env.get("/v2/library/app/manifests/latest")
    assert (status, _codes(body)) == (404, ["MANIFEST_UNKNOWN"])
    status, _, body = await env.get("/v2/library/app/manifests/1.0", ns=None)
    assert (status, _codes(body)) == (404, ["NAME_UNKNOWN"])
    assert b"default_registry" in body
    stats = env.registry.app.ctx.stats
    assert stats.count(RequestKind.MANIFEST, Result.REFUSED) == 3


async def test_default_registry_serves_requests_without_ns(tmp_path: Path) -> None:
    store = MemoryStore()
    content = _fill(store)
    async with (
        serve_registry(store, tmp_path, default_registry="docker.io") as registry,
        aiohttp.ClientSession() as session,
        session.get(f"{registry.url}/v2/app/manifests/1.0") as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Docker-Content-Digest"] == content.manifest.digest
        assert resp.headers["OCI-Namespace"] == "docker.io"


async def test_latest_and_filters_from_config(tmp_path: Path) -> None:
    store = MemoryStore()
    _fill(store, "docker.io/library/app:latest")
    _fill(store, "docker.io/library/other:1.0", seed=b"o")
    async with (
        serve_registry(store, tmp_path, allow_latest=True, filters=[r"/library/app:"]) as registry,
        aiohttp.ClientSession() as session,
    ):
        async with session.get(f"{registry.url}/v2/library/app/manifests/latest?ns=docker.io") as r:
            assert r.status == 200
        async with session.get(f"{registry.url}/v2/library/other/manifests/1.0?ns=docker.io") as r:
            assert r.status == 404
            assert "matches none of registry.filters" in (await r.text())


async def test_peer_requests_are_served_from_local_content_only(env: Env) -> None:
    peer = {PEER_HEADER: "1"}
    status, _, _ = await env.get("/v2/library/app/manifests/1.0", **peer)
    assert status == 200
    missing = "sha256:" + "0" * 64
    status, _, body = await env.get(f"/v2/library/app/blobs/{missing}", **peer)
    assert (status, _codes(body)) == (404, ["BLOB_UNKNOWN"])
    assert b"local content only" in body
    stats = env.registry.app.ctx.stats
    assert stats.count(RequestKind.MANIFEST, Result.LOCAL_HIT, from_peer=True) == 1
    assert stats.count(RequestKind.BLOB, Result.REFUSED, from_peer=True) == 1
    # The same miss from a local client is a plain not-found.
    await env.get(f"/v2/library/app/blobs/{missing}")
    assert stats.count(RequestKind.BLOB, Result.NOT_FOUND, from_peer=False) == 1


async def test_cache_follows_store_events(env: Env) -> None:
    keeper = env.registry.app.ctx.content.keeper
    await asyncio.wait_for(keeper.watching.wait(), 10)
    path = "/v2/library/app/manifests/1.0"
    _, headers, _ = await env.get(path)
    assert headers["Docker-Content-Digest"] == env.content.manifest.digest
    assert env.registry.app.ctx.content.cache.tag("docker.io/library/app:1.0") is not None

    # Retag to an index: the image event drops the cached resolution.
    cache = env.registry.app.ctx.content.cache
    index = _json({"schemaVersion": 2, "manifests": [{"digest": env.content.manifest.digest}]})
    target = Descriptor(env.content.store.add_blob(index), len(index), OCI_INDEX)
    seen = cache.generation
    env.content.store.set_image("docker.io/library/app:1.0", target)
    await wait_until(lambda: cache.generation >= seen + 1, 10.0, what="the image event applied")
    _, headers, body = await env.get(path)
    assert headers["Docker-Content-Digest"] == target.digest
    assert headers["Content-Type"] == OCI_INDEX
    assert body == index

    # Deleted content is no longer served, even though it was cached.
    seen = cache.generation
    env.content.store.delete_image("docker.io/library/app:1.0")
    env.content.store.delete_blob(target.digest)
    await wait_until(lambda: cache.generation >= seen + 2, 10.0, what="both delete events applied")
    status, _, _ = await env.get(f"/v2/library/app/manifests/{target.digest}")
    assert status == 404
    status, _, _ = await env.get(path)
    assert status == 404


async def test_unreachable_store_answers_404_at_once(tmp_path: Path) -> None:
    cfg = NodeConfig(
        registry=RegistrySection(
            host="127.0.0.1",
            port=0,
            registries_file=write_registries_file(tmp_path / "registries.yaml", ["*"]),
        ),
        store=StoreSection(backend="containerd", containerd_address=str(tmp_path / "no.sock")),
        tls=TlsSection(enabled=False),
    )
    app = create_app(cfg, name=f"pm_registry_{uuid.uuid4().hex[:12]}")
    http = HttpServer(app, "127.0.0.1", 0)
    await http.start()
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                f"http://127.0.0.1:{http.port}/v2/library/app/manifests/1.0?ns=docker.io",
                timeout=aiohttp.ClientTimeout(total=5),
            ) as resp,
        ):
            assert resp.status == 404
            assert "content store unavailable" in await resp.text()
        assert app.ctx.stats.count(RequestKind.MANIFEST, Result.ERROR) == 1
    finally:
        await http.stop()


async def test_introspection_reports_counts_and_bytes(env: Env) -> None:
    await env.get("/v2/library/app/manifests/1.0")
    await env.get(f"/v2/library/app/blobs/{env.content.layer.digest}")
    await env.get("/v2/library/app/manifests/nope")
    await env.get("/v2/library/app/manifests/1.0", method="DELETE")
    server = GrpcServer("127.0.0.1:0", name="test-introspection")
    register(server, env.registry.app.ctx.stats)
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = await pb_grpc.RegistryIntrospectionStub(channel).Stats(pb.StatsRequest())
    finally:
        await server.stop(grace=None)
    counts = {(c.kind, c.result, c.from_peer): c.count for c in reply.requests}
    assert counts == {
        (pb.REQUEST_KIND_MANIFEST, pb.REQUEST_RESULT_LOCAL_HIT, False): 1,
        (pb.REQUEST_KIND_BLOB, pb.REQUEST_RESULT_LOCAL_HIT, False): 1,
        (pb.REQUEST_KIND_MANIFEST, pb.REQUEST_RESULT_NOT_FOUND, False): 1,
        (pb.REQUEST_KIND_MANIFEST, pb.REQUEST_RESULT_CLIENT_ERROR, False): 1,
    }
    assert reply.bytes_served_local == env.content.manifest.size + env.content.layer.size
    assert reply.bytes_relayed == 0
    assert reply.in_flight == 0
    assert reply.started_at.seconds > 0


@pytest.mark.parametrize("backend", ["file", "stream"])
async def test_client_leaving_mid_body_is_counted_and_harmless(
    tmp_path: Path, backend: str
) -> None:
    data = hashlib.sha256(backend.encode()).digest() * (32 * MiB // 32)
    store: ContentStore
    if backend == "file":
        layout = OciLayoutStore(tmp_path / "layout", create=True)
        digest, store = layout.add_blob_bytes(data), layout
    else:
        memory = MemoryStore(read_chunk=MiB)
        digest, store = memory.add_blob(data), memory
    async with serve_registry(store, tmp_path) as registry:
        reader, writer = await asyncio.open_connection("127.0.0.1", registry.port)
        writer.write(f"GET /v2/a/blobs/{digest}?ns=docker.io HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        await writer.drain()
        assert (await reader.read(4096)).startswith(b"HTTP/1.1 200")
        writer.transport.abort()
        stats = registry.app.ctx.stats
        await wait_until(
            lambda: stats.count(RequestKind.BLOB, Result.ERROR) >= 1, 5.0, what="the error counted"
        )
        assert stats.count(RequestKind.BLOB, Result.ERROR) == 1
        assert stats.in_flight == 0
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{registry.url}/v2/a/blobs/{digest}?ns=docker.io") as resp,
        ):
            assert resp.status == 200
            assert await resp.read() == data
    await store.close()
