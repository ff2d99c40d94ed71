"""Blob redirects as large registries send them (307 to storage): followed, bounded, http(s)
only, and the registry's Authorization header never sent to another host.

The registry side is a small aiohttp app on loopback standing in for a registry whose blobs live
in object storage: it asks for Basic auth, redirects once on its own host, then to
`localhost:<same port>` (another host by URL), which serves the bytes. It records the
Authorization header of every request it gets.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from services.common.k3s.registries import parse_registries
from services.registry.upstream import UpstreamClient, UpstreamSettings, UpstreamUnavailable
from tests.harness.service_procs import free_port

REGISTRY = "registry.test:5000"
USER, PASSWORD = "puller", "pw"
BLOB = os.urandom(200_000)
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
TO_FILE = "sha256:" + "f" * 64
LOOPING = "sha256:" + "e" * 64


@dataclass
class Redirector:
    port: int = 0
    seen: list[tuple[str, str | None]] = field(default_factory=list)

    async def blob(self, request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization")
        self.seen.append((request.path, auth))
        if auth is None:
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="r"'})
        digest = request.match_info["digest"]
        if digest == TO_FILE:
            return web.Response(status=302, headers={"Location": "file:///etc/hostname"})
        if digest == LOOPING:
            return web.Response(status=307, headers={"Location": request.path})
        return web.Response(status=307, headers={"Location": f"/same/{digest}"})

    async def same(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.path, request.headers.get("Authorization")))
        digest = request.match_info["digest"]
        target = f"http://localhost:{self.port}/storage/{digest}"
        return web.Response(status=307, headers={"Location": target})

    async def storage(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.path, request.headers.get("Authorization")))
        return web.Response(body=BLOB, content_type="application/octet-stream")


@pytest.fixture
async def redirector() -> AsyncIterator[Redirector]:
    state = Redirector(port=free_port())
    app = web.Application()
    app.router.add_get("/v2/{name:.+}/blobs/{digest}", state.blob)
    app.router.add_get("/same/{digest}", state.same)
    app.router.add_get("/storage/{digest}", state.storage)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", state.port).start()
    yield state
    await runner.cleanup()


@pytest.fixture
async def client(redirector: Redirector) -> AsyncIterator[UpstreamClient]:
    host = f"127.0.0.1:{redirector.port}"
    regs = parse_registries(
        f"mirrors:\n  '{REGISTRY}':\n    endpoint: ['http://{host}']\n"
        f"configs:\n  '{host}':\n    auth: {{username: {USER}, password: {PASSWORD}}}\n"
    )
    upstream = UpstreamClient(lambda: regs, UpstreamSettings(disable_default_endpoint=True))
    yield upstream
    await upstream.close()


async def test_redirect_keeps_auth_on_the_same_host_and_drops_it_on_another(
    client: UpstreamClient, redirector: Redirector
) -> None:
    async with await client.fetch_blob(REGISTRY, "team/app", DIGEST) as body:
        data = b"".join([chunk async for chunk in body.chunks()])
        assert body.url.startswith(f"http://localhost:{redirector.port}/storage/")
    assert data == BLOB
    basic = redirector.seen[1][1]
    assert basic is not None and basic.startswith("Basic ")
    assert redirector.seen == [
        (f"/v2/team/app/blobs/{DIGEST}", None),
        (f"/v2/team/app/blobs/{DIGEST}", basic),
        (f"/same/{DIGEST}", basic),
        (f"/storage/{DIGEST}", None),
    ]


async def test_redirect_to_another_scheme_is_never_followed(client: UpstreamClient) -> None:
    with pytest.raises(UpstreamUnavailable, match=r"non-http\(s\) URL 'file:///etc/hostname'"):
        await client.fetch_blob(REGISTRY, "team/app", TO_FILE)
    assert client.limiter.in_flight == 0


async def test_redirects_are_bounded(client: UpstreamClient, redirector: Redirector) -> None:
    with pytest.raises(UpstreamUnavailable, match="more than 10 redirects"):
        await client.fetch_blob(REGISTRY, "team/app", LOOPING)
    looped = [path for path, _ in redirector.seen if LOOPING in path]
    assert len(looped) == 1 + 11  # the 401, then the first request and its 10 redirects


async def test_an_endpoint_ignoring_range_still_yields_bytes_from_the_offset(
    client: UpstreamClient,
) -> None:
    # The storage host answers 200 with the whole blob whatever the Range asked.
    async with await client.fetch_blob(REGISTRY, "team/app", DIGEST, offset=1000) as body:
        assert body.status == 200 and body.offset == 1000
        assert body.length == len(BLOB) - 1000
        data = b"".join([chunk async for chunk in body.chunks()])
    assert data == BLOB[1000:]


@pytest.mark.parametrize(
    ("registry", "repository", "digest"),
    [
        ("bad host/x", "team/app", DIGEST),
        (REGISTRY, "Team/App", DIGEST),
        (REGISTRY, "team/app", "sha256:short"),
    ],
)
async def test_malformed_input_is_a_value_error_and_takes_no_slot(
    client: UpstreamClient, redirector: Redirector, registry: str, repository: str, digest: str
) -> None:
    with pytest.raises(ValueError):
        await client.fetch_blob(registry, repository, digest)
    assert client.limiter.in_flight == 0 and redirector.seen == []
