"""The upstream harness inside a mesh namespace: a TLS docker-registry with `auth: token` and its
token server in a namespace of their own, as multi-node tests of upstream fetching use them, and
the upstream client fetching through both across the mesh bridge."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from services.common.k3s.registries import parse_registries
from services.registry.upstream import UpstreamAuthError, UpstreamClient, UpstreamSettings
from tests.harness.fixtures_mesh import MeshFactory
from tests.harness.images import build_image
from tests.harness.token_server import SigningKey, TokenPolicy
from tests.harness.upstream import (
    SentBytes,
    ServerTls,
    TokenAuth,
    UpstreamOptions,
    push_image,
    start_in_netns,
    start_token_server,
)

pytestmark = pytest.mark.containerd

REGISTRY = "registry.test:5000"
USER, PASSWORD = "puller", "s3cret"


async def test_token_and_tls_upstream_in_a_namespace(
    mesh_factory: MeshFactory, tmp_path: Path
) -> None:
    mesh = mesh_factory(1, services=())
    host = mesh.add_host("upstream")
    tls = ServerTls.create(host.dir / "pki", ip=host.ip)
    key_files = SigningKey.generate().write(host.dir / "token")
    policy = TokenPolicy(issuer="test-issuer", service="test-registry", users={USER: PASSWORD})
    tokens = start_token_server(host.dir, policy, key_files, host=host)
    auth = TokenAuth(tokens.realm, policy.service, policy.issuer, rootcertbundle=key_files[0])
    upstream = start_in_netns(host, UpstreamOptions(tls=tls, token=auth))
    image = build_image(tmp_path / "layout", name=f"{REGISTRY}/team/app:1.0")
    push_image(image, upstream, creds=(USER, PASSWORD), ca_dir=tls.ca_dir, via=host)

    regs = parse_registries(
        f"mirrors:\n  '{REGISTRY}':\n    endpoint: ['{upstream.url}']\n"
        f"configs:\n  '{upstream.hostport}':\n"
        f"    tls: {{ca_file: '{tls.ca_file}'}}\n"
        f"    auth: {{username: {USER}, password: {PASSWORD}}}\n"
    )
    client = UpstreamClient(lambda: regs, UpstreamSettings(disable_default_endpoint=True))
    sent = SentBytes(host, upstream.port).install()
    try:
        before = len(tokens.records())
        digest = image.platforms[0].layers[0].descriptor.digest
        async with await client.fetch_blob(REGISTRY, "team/app", digest) as body:
            data = b"".join([chunk async for chunk in body.chunks()])
        assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
        assert [r["user"] for r in tokens.records()[before:]] == [USER]
        # Counted outside the client: by the registry itself and by the upstream's kernel.
        assert upstream.body_bytes("GET", f"/v2/team/app/blobs/{digest}") == len(data)
        assert len(data) < sent.read() < len(data) * 1.05 + 64 * 1024
    finally:
        await client.close()
    anonymous_regs = parse_registries(
        f"mirrors:\n  '{REGISTRY}':\n    endpoint: ['{upstream.url}']\n"
        f"configs:\n  '{upstream.hostport}':\n    tls: {{ca_file: '{tls.ca_file}'}}\n"
    )
    anonymous = UpstreamClient(
        lambda: anonymous_regs, UpstreamSettings(disable_default_endpoint=True)
    )
    try:
        with pytest.raises(UpstreamAuthError):
            await anonymous.fetch_manifest(REGISTRY, "team/app", "1.0")
    finally:
        await anonymous.close()
