"""The coordinator over the node's real UpstreamClient and a real docker-registry on loopback:
blobs spooled and verified, a resumed fetch knows the whole size, tags resolved through the
manifest window, and an upstream that refuses us is a plain miss (containerd pulls itself)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from services.common.k3s.registries import parse_registries
from services.registry.inflight.coordinator import (
    Coordinator,
    Fetching,
    InflightSettings,
    Unavailable,
)
from services.registry.inflight.ports import Holder, UpstreamManifest
from services.registry.inflight.spool import SpoolPool
from services.registry.inflight.upstream_adapter import ClientFetcher
from services.registry.upstream import UpstreamClient, UpstreamSettings
from tests.harness.fake_router import FakeRouter, LeaseTable
from tests.harness.images import BuiltImage, build_image
from tests.harness.upstream import (
    DistributionRegistry,
    UpstreamOptions,
    loopback_registry,
    push_image,
    write_htpasswd,
)

REGISTRY = "registry.test:5000"
REPO = "team/app"


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    out = tmp_path_factory.mktemp("image")
    return build_image(out / "layout", name=f"{REGISTRY}/{REPO}:1.0", layers=2, layer_size=700_000)


@pytest.fixture(scope="module")
def upstream(
    tmp_path_factory: pytest.TempPathFactory, image: BuiltImage
) -> Iterator[DistributionRegistry]:
    with loopback_registry(tmp_path_factory.mktemp("plain")) as reg:
        push_image(image, reg)
        yield reg


def _coordinator(
    tmp_path: Path, reg: DistributionRegistry, leases: LeaseTable | None = None
) -> tuple[Coordinator, UpstreamClient]:
    registries = parse_registries(
        f"mirrors:\n  '{REGISTRY}':\n    endpoint: ['http://{reg.hostport}']\n"
    )
    # The default endpoint (registry.test:5000) must never be dialed.
    client = UpstreamClient(lambda: registries, UpstreamSettings(disable_default_endpoint=True))
    pool = SpoolPool(tmp_path / "spool", 64 << 20, grace_s=60)
    pool.open()
    coordinator = Coordinator(
        InflightSettings(),
        pool,
        (leases or LeaseTable()).client(Holder("127.0.0.1", 1)),
        ClientFetcher(client),
        FakeRouter(),
    )
    return coordinator, client


@pytest.fixture
async def node(
    tmp_path: Path, upstream: DistributionRegistry
) -> AsyncIterator[tuple[Coordinator, UpstreamClient]]:
    coordinator, client = _coordinator(tmp_path, upstream)
    yield coordinator, client
    await coordinator.close()
    await client.close()


def _layer(image: BuiltImage) -> tuple[str, bytes]:
    digest = image.platforms[0].layers[-1].descriptor.digest
    return digest, image.blob_paths[digest].read_bytes()


async def test_blob_is_spooled_from_the_real_upstream_and_verified(
    node: tuple[Coordinator, UpstreamClient], image: BuiltImage
) -> None:
    coordinator, _ = node
    digest, data = _layer(image)
    claim = await coordinator.claim_blob(REGISTRY, REPO, digest)
    assert isinstance(claim, Fetching)
    got = b"".join([c async for c in claim.spool.read(0, claim.spool.size, 10)])
    await claim.spool.verdict(10)
    assert got == data


async def test_resumed_fetch_knows_the_whole_size(
    node: tuple[Coordinator, UpstreamClient], image: BuiltImage
) -> None:
    coordinator, _ = node
    digest, data = _layer(image)
    body = await coordinator.upstream.fetch_blob(REGISTRY, REPO, digest, 500_000)
    try:
        assert body.size == len(data)
        assert b"".join([c async for c in body.chunks()]) == data[500_000:]
    finally:
        await body.aclose()


async def test_tag_resolved_once_through_the_window(
    node: tuple[Coordinator, UpstreamClient], image: BuiltImage, upstream: DistributionRegistry
) -> None:
    coordinator, _ = node
    before = len(upstream.requests("GET", "/manifests/"))
    key = f"{REGISTRY}/{REPO}:1.0"
    first = await coordinator.claim_manifest(REGISTRY, REPO, "1.0", key)
    again = await coordinator.claim_manifest(REGISTRY, REPO, "1.0", key)
    assert isinstance(first, UpstreamManifest) and first == again
    assert first.digest == image.target.digest
    assert first.media_type == image.target.media_type
    assert len(upstream.requests("GET", "/manifests/")) == before + 1


async def test_upstream_refusing_our_credentials_is_a_plain_miss(
    tmp_path: Path, image: BuiltImage
) -> None:
    users = write_htpasswd(tmp_path / "htpasswd", {"someone": "else"})
    with loopback_registry(tmp_path / "reg", UpstreamOptions(htpasswd=users)) as reg:
        leases = LeaseTable()
        coordinator, client = _coordinator(tmp_path, reg, leases)
        try:
            digest, _ = _layer(image)
            claim = await coordinator.claim_blob(REGISTRY, REPO, digest)
            assert isinstance(claim, Unavailable)
            assert "Auth" in claim.reason
            assert leases.held == {}  # released at once for the next asker
        finally:
            await coordinator.close()
            await client.close()
