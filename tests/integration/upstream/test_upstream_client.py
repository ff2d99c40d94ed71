"""The upstream client against a real Debian docker-registry on loopback.

Plain http, TLS with a test CA, HTTP basic (htpasswd) and token auth (`auth: token`, the
registry checking tokens our test token server signs): the client must fetch exactly what
containerd would, from exactly the endpoints containerd would, and fail with the typed errors
the caller turns into a fast 404.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import AsyncIterator, Iterator
from typing import Any, Protocol

import pytest
from prometheus_client import CollectorRegistry

from services.common.config import UpstreamSection
from services.common.k3s.registries import Registries, parse_registries
from services.registry.upstream import (
    MANIFEST_ACCEPT,
    UpstreamAuthError,
    UpstreamBusy,
    UpstreamClient,
    UpstreamMetrics,
    UpstreamNotFound,
    UpstreamSettings,
    UpstreamUnavailable,
)
from tests.harness.images import BuiltImage, build_image
from tests.harness.token_server import SigningKey, TokenPolicy
from tests.harness.upstream import (
    DistributionRegistry,
    ServerTls,
    TokenAuth,
    TokenServerProcess,
    UpstreamOptions,
    loopback_registry,
    push_image,
    start_token_server,
    write_htpasswd,
)

REGISTRY = "registry.test:5000"
USER, PASSWORD = "puller", "s3cret"
SERVICE, ISSUER = "peermirror-test-registry", "peermirror-test-issuer"
REFRESH_TOKEN = "refresh-token-for-tests"
MISSING = "sha256:" + "0" * 64


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    out = tmp_path_factory.mktemp("image")
    return build_image(
        out / "layout", name=f"{REGISTRY}/team/app:1.0", layers=2, layer_size=300_000
    )


@pytest.fixture(scope="module")
def plain(
    tmp_path_factory: pytest.TempPathFactory, image: BuiltImage
) -> Iterator[DistributionRegistry]:
    with loopback_registry(tmp_path_factory.mktemp("plain")) as reg:
        push_image(image, reg)
        yield reg


@pytest.fixture(scope="module")
def tls_upstream(
    tmp_path_factory: pytest.TempPathFactory, image: BuiltImage
) -> Iterator[tuple[DistributionRegistry, ServerTls]]:
    work = tmp_path_factory.mktemp("tls")
    tls = ServerTls.create(work / "pki")
    with loopback_registry(work / "reg", UpstreamOptions(tls=tls)) as reg:
        push_image(image, reg, ca_dir=tls.ca_dir)
        yield reg, tls


@pytest.fixture(scope="module")
def basic_upstream(
    tmp_path_factory: pytest.TempPathFactory, image: BuiltImage
) -> Iterator[DistributionRegistry]:
    work = tmp_path_factory.mktemp("basic")
    htpasswd = write_htpasswd(work / "htpasswd", {USER: PASSWORD})
    with loopback_registry(work / "reg", UpstreamOptions(htpasswd=htpasswd)) as reg:
        push_image(image, reg, creds=(USER, PASSWORD))
        yield reg


@pytest.fixture(scope="module")
def token_upstream(
    tmp_path_factory: pytest.TempPathFactory, image: BuiltImage
) -> Iterator[tuple[DistributionRegistry, TokenServerProcess]]:
    work = tmp_path_factory.mktemp("token")
    key_files = SigningKey.generate().write(work / "token")
    policy = TokenPolicy(
        issuer=ISSUER,
        service=SERVICE,
        users={USER: PASSWORD},
        refresh_tokens=frozenset({REFRESH_TOKEN}),
    )
    tokens = start_token_server(work / "token", policy, key_files)
    try:
        auth = TokenAuth(tokens.realm, SERVICE, ISSUER, rootcertbundle=key_files[0])
        with loopback_registry(work / "reg", UpstreamOptions(token=auth)) as reg:
            push_image(image, reg, creds=(USER, PASSWORD))
            yield reg, tokens
    finally:
        tokens.stop()


def registries(text: str) -> Registries:
    return parse_registries(text)


def mirror_of(endpoint: str, configs: str = "", *, registry: str = REGISTRY) -> Registries:
    """REGISTRY mirrored by `endpoint`, with optional `configs` YAML lines."""
    text = f"mirrors:\n  '{registry}':\n    endpoint: ['{endpoint}']\n"
    if configs:
        text += "configs:\n" + configs
    return registries(text)


class MakeClient(Protocol):
    def __call__(
        self, regs: Registries, *, metrics: UpstreamMetrics | None = None, **settings: Any
    ) -> UpstreamClient: ...


@pytest.fixture
async def make_client() -> AsyncIterator[MakeClient]:
    clients: list[UpstreamClient] = []

    def make(
        regs: Registries, *, metrics: UpstreamMetrics | None = None, **settings: Any
    ) -> UpstreamClient:
        # The default endpoint would be registry.test:5000, which must never be dialed.
        settings.setdefault("disable_default_endpoint", True)
        client = UpstreamClient(lambda: regs, UpstreamSettings(**settings), metrics)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


async def read_all(client: UpstreamClient, digest: str, offset: int = 0) -> bytes:
    async with await client.fetch_blob(REGISTRY, "team/app", digest, offset) as body:
        return b"".join([chunk async for chunk in body.chunks()])


def layer(image: BuiltImage) -> str:
    return image.platforms[0].layers[-1].descriptor.digest


# --- plain http -------------------------------------------------------------------------------


async def test_manifest_by_tag_and_digest_with_containerds_accept(
    plain: DistributionRegistry, image: BuiltImage, make_client: MakeClient
) -> None:
    client = make_client(mirror_of(plain.url))
    manifest = image.read_blob(image.target.digest)
    async with await client.fetch_manifest(REGISTRY, "team/app", "1.0") as body:
        assert body.status == 200
        assert body.digest == image.target.digest
        assert body.media_type == image.target.media_type
        assert await body.read() == manifest
    head = await client.fetch_manifest(REGISTRY, "team/app", "1.0", head=True)
    assert head.status == 200 and head.digest == image.target.digest
    assert head.length == len(manifest)
    by_digest = await client.fetch_manifest(REGISTRY, "team/app", image.target.digest)
    assert await by_digest.read() == manifest
    ours = [
        r
        for r in plain.requests(path_part="/manifests/")
        if "peermirror" in r.get("http.request.useragent", "")
    ]
    assert [r["http.request.method"] for r in ours] == ["GET", "HEAD", "GET"]
    assert all(r["http.request.uri"].endswith("?ns=registry.test%3A5000") for r in ours)
    assert client.limiter.in_flight == 0  # every body closed gave its slot back


async def test_blob_whole_and_resumed_with_a_range_counts_bytes(
    plain: DistributionRegistry, image: BuiltImage, make_client: MakeClient
) -> None:
    metrics = UpstreamMetrics(CollectorRegistry())
    client = make_client(mirror_of(plain.url), metrics=metrics)
    digest = layer(image)
    expected = image.blob_path(digest).read_bytes()
    whole = await read_all(client, digest)
    assert hashlib.sha256(whole).hexdigest() == digest.split(":")[1]
    offset = len(expected) // 3
    async with await client.fetch_blob(REGISTRY, "team/app", digest, offset) as body:
        assert body.status == 206 and body.offset == offset
        assert body.length == len(expected) - offset
        rest = b"".join([c async for c in body.chunks()])
    assert rest == expected[offset:]
    assert metrics.bytes._value.get() == len(expected) * 2 - offset
    assert metrics.requests.labels(kind="blob", result="ok")._value.get() == 2


async def test_missing_blob_is_not_found(
    plain: DistributionRegistry, make_client: MakeClient
) -> None:
    client = make_client(mirror_of(plain.url))
    with pytest.raises(UpstreamNotFound, match="HTTP 404"):
        await client.fetch_blob(REGISTRY, "team/app", MISSING)
    assert client.limiter.in_flight == 0


async def test_rewrites_are_applied_to_the_repository_path(
    plain: DistributionRegistry, image: BuiltImage, make_client: MakeClient
) -> None:
    text = (
        f"mirrors:\n  '{REGISTRY}':\n    endpoint: ['{plain.url}']\n"
        "    rewrite:\n      '^library/(.*)': 'team/$1'\n"
    )
    client = make_client(registries(text))
    async with await client.fetch_manifest(REGISTRY, "library/app", "1.0") as body:
        assert body.digest == image.target.digest
    assert plain.requests("GET", "/v2/team/app/manifests/1.0?ns=")


# --- only containerd's endpoints ---------------------------------------------------------------


class ConnectionCounter:
    """A loopback listener that only counts the connections it accepts."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            writer.close()

        self.server = await asyncio.start_server(accept, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def test_disable_default_endpoint_contacts_only_the_listed_endpoint(
    plain: DistributionRegistry, image: BuiltImage, make_client: MakeClient
) -> None:
    counter = ConnectionCounter()
    port = await counter.start()
    registry = f"127.0.0.1:{port}"  # its default endpoint would be http://127.0.0.1:<port>
    try:
        regs = mirror_of(plain.url, registry=registry)
        only_listed = make_client(regs, disable_default_endpoint=True)
        with pytest.raises(UpstreamNotFound):
            await only_listed.fetch_blob(registry, "team/app", MISSING)
        body = await only_listed.fetch_manifest(registry, "team/app", "1.0")
        assert body.digest == image.target.digest
        body.close()
        assert counter.connections == 0
        # The same miss with the default endpoint enabled does reach it: the counter works.
        with_default = make_client(regs, disable_default_endpoint=False)
        with pytest.raises((UpstreamNotFound, UpstreamUnavailable)):
            await with_default.fetch_blob(registry, "team/app", MISSING)
        assert counter.connections >= 1
    finally:
        await counter.stop()


# --- TLS ----------------------------------------------------------------------------------------


async def test_tls_with_the_configured_ca(
    tls_upstream: tuple[DistributionRegistry, ServerTls], image: BuiltImage, make_client: MakeClient
) -> None:
    reg, tls = tls_upstream
    with_ca = make_client(
        mirror_of(reg.url, f"  '{reg.hostport}':\n    tls: {{ca_file: '{tls.ca_file}'}}\n")
    )
    assert hashlib.sha256(await read_all(with_ca, layer(image))).hexdigest() in layer(image)
    skip = make_client(
        mirror_of(reg.url, f"  '{reg.hostport}':\n    tls: {{insecure_skip_verify: true}}\n")
    )
    assert await read_all(skip, layer(image))
    without = make_client(mirror_of(reg.url))
    with pytest.raises(UpstreamUnavailable, match=r"(?i)certificate"):
        await without.fetch_blob(REGISTRY, "team/app", layer(image))


# --- basic auth ---------------------------------------------------------------------------------


async def test_basic_auth_with_username_password_or_auth_field(
    basic_upstream: DistributionRegistry, image: BuiltImage, make_client: MakeClient
) -> None:
    reg = basic_upstream
    host = reg.hostport
    plain_creds = make_client(
        mirror_of(reg.url, f"  '{host}':\n    auth: {{username: {USER}, password: {PASSWORD}}}\n")
    )
    async with await plain_creds.fetch_manifest(REGISTRY, "team/app", "1.0") as body:
        assert body.digest == image.target.digest
    assert await read_all(plain_creds, layer(image))  # Basic sent at once this time
    encoded = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    auth_field = make_client(mirror_of(reg.url, f"  '{host}':\n    auth: {{auth: {encoded}}}\n"))
    assert await read_all(auth_field, layer(image))


async def test_basic_auth_wrong_or_missing_credentials_is_an_auth_error(
    basic_upstream: DistributionRegistry, image: BuiltImage, make_client: MakeClient
) -> None:
    reg = basic_upstream
    wrong = make_client(
        mirror_of(reg.url, f"  '{reg.hostport}':\n    auth: {{username: {USER}, password: nope}}\n")
    )
    with pytest.raises(UpstreamAuthError, match="HTTP 401"):
        await wrong.fetch_blob(REGISTRY, "team/app", layer(image))
    anonymous = make_client(mirror_of(reg.url))
    with pytest.raises(UpstreamAuthError, match="no credentials"):
        await anonymous.fetch_manifest(REGISTRY, "team/app", "1.0")
    assert wrong.limiter.in_flight == 0 and anonymous.limiter.in_flight == 0


# --- token auth ---------------------------------------------------------------------------------


async def test_token_flow_with_basic_credentials_and_a_cached_token(
    token_upstream: tuple[DistributionRegistry, TokenServerProcess],
    image: BuiltImage,
    make_client: MakeClient,
) -> None:
    reg, tokens = token_upstream
    before = len(tokens.records())
    client = make_client(
        mirror_of(
            reg.url, f"  '{reg.hostport}':\n    auth: {{username: {USER}, password: {PASSWORD}}}\n"
        )
    )
    async with await client.fetch_manifest(REGISTRY, "team/app", "1.0") as body:
        assert await body.read() == image.read_blob(image.target.digest)
    for blob in image.blobs:
        if blob.digest != image.target.digest:
            data = await read_all(client, blob.digest)
            assert hashlib.sha256(data).hexdigest() == blob.digest.split(":")[1]
    # One token for the repository's pull scope, reused by every later request.
    assert [(r["grant"], r["user"], r["scopes"]) for r in tokens.records()[before:]] == [
        ("basic", USER, ["repository:team/app:pull"])
    ]


async def test_token_flow_with_an_identity_token_as_refresh_token(
    token_upstream: tuple[DistributionRegistry, TokenServerProcess],
    image: BuiltImage,
    make_client: MakeClient,
) -> None:
    reg, tokens = token_upstream
    before = len(tokens.records())
    client = make_client(
        mirror_of(reg.url, f"  '{reg.hostport}':\n    auth: {{identity_token: {REFRESH_TOKEN}}}\n")
    )
    assert await read_all(client, layer(image))
    assert [(r["method"], r["grant"]) for r in tokens.records()[before:]] == [
        ("POST", "refresh_token")
    ]


async def test_token_flow_wrong_credentials_is_an_auth_error(
    token_upstream: tuple[DistributionRegistry, TokenServerProcess],
    image: BuiltImage,
    make_client: MakeClient,
) -> None:
    reg, _ = token_upstream
    wrong = make_client(
        mirror_of(reg.url, f"  '{reg.hostport}':\n    auth: {{username: {USER}, password: bad}}\n")
    )
    with pytest.raises(UpstreamAuthError, match="token endpoint answered 401"):
        await wrong.fetch_blob(REGISTRY, "team/app", layer(image))
    anonymous = make_client(mirror_of(reg.url))
    with pytest.raises(UpstreamAuthError):
        await anonymous.fetch_manifest(REGISTRY, "team/app", "1.0", head=True)


# --- per-node limits ----------------------------------------------------------------------------


async def test_past_the_fetch_cap_a_fetch_is_refused_busy(
    plain: DistributionRegistry, image: BuiltImage, make_client: MakeClient
) -> None:
    client = make_client(
        mirror_of(plain.url), limits=UpstreamSection(max_concurrent_fetches=1, queue_wait=0.05)
    )
    held = await client.fetch_blob(REGISTRY, "team/app", layer(image))
    with pytest.raises(UpstreamBusy):
        await client.fetch_manifest(REGISTRY, "team/app", "1.0")
    held.close()
    async with await client.fetch_manifest(REGISTRY, "team/app", "1.0") as body:
        assert body.digest == image.target.digest


async def test_bandwidth_capped_fetch_delivers_every_byte(
    plain: DistributionRegistry, image: BuiltImage, make_client: MakeClient
) -> None:
    client = make_client(
        mirror_of(plain.url), limits=UpstreamSection(max_bandwidth=4 * 1024 * 1024)
    )
    data = await read_all(client, layer(image))
    assert data == image.blob_path(layer(image)).read_bytes()


def test_accept_header_names_the_four_manifest_types() -> None:
    for media_type in (
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ):
        assert media_type in MANIFEST_ACCEPT


async def test_concurrent_fetches_of_one_repository_share_one_token_request(
    token_upstream: tuple[DistributionRegistry, TokenServerProcess],
    image: BuiltImage,
    make_client: MakeClient,
) -> None:
    reg, tokens = token_upstream
    before = len(tokens.records())
    creds = f"  '{reg.hostport}':\n    auth: {{username: {USER}, password: {PASSWORD}}}\n"
    client = make_client(mirror_of(reg.url, creds))
    blobs = [b.digest for b in image.blobs if b.digest != image.target.digest]
    results = await asyncio.gather(*(read_all(client, d) for d in blobs * 3))
    assert [hashlib.sha256(r).hexdigest() for r in results] == [d[7:] for d in blobs * 3]
    assert len(tokens.records()) == before + 1
