"""Shared first pulls from upstreams that want credentials, and from the listed endpoint only.

- basic auth (htpasswd) and token auth (`auth: token` over TLS, with a token server the test
  runs; docker-registry checks the tokens' signatures itself), credentials in registries.yaml:
  a wave of three nodes still costs the upstream one image;
- wrong credentials in registries.yaml: every pull behaves as without peermirror (the mirror
  answers 404 at once and containerd pulls with the pod's own pull secret);
- `disable-default-registry-endpoint` with an endpoint listed: only that endpoint is fetched from,
  the registry's own host (which holds the image too) sends nothing.

containerd gets the credentials as kubelet gives them: CRI PullImage's auth.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness.first_pull_wave import image_bytes, new_image, pull_together
from tests.harness.fixtures_mesh import running_mesh
from tests.harness.images import BuiltImage
from tests.harness.mesh import NOWHERE, Mesh, NetnsHost, deep_merge, registries_data
from tests.harness.mesh_p2p import FAST_TIMINGS, assert_holds_verified
from tests.harness.token_server import SigningKey, TokenPolicy
from tests.harness.upstream import (
    DistributionRegistry,
    SentBytes,
    ServerTls,
    TokenAuth,
    UpstreamOptions,
    push_image,
    start_in_netns,
    start_token_server,
    write_htpasswd,
)

pytestmark = pytest.mark.containerd

USER, PASSWORD = "puller", "s3cret"
CREDS = (USER, PASSWORD)
WAVE = 3
LAYER_SIZE = 16 * 1024 * 1024  # a 64 MiB image
WAVE_BOUND = 1.05
PORT = 5000


def point_at(mesh: Mesh, document: Mapping[str, Any]) -> None:
    """Every node's registries.yaml becomes `document`; the pinners and registries are
    restarted, so hosts.toml and what the registry mirrors follow it before the test goes on
    (both would on their own within seconds)."""
    for node in mesh.nodes:
        path = Path(node.config["registry"]["registries_file"])
        path.write_text(yaml.safe_dump(dict(document), sort_keys=False))
        for service in ("pinner", "registry"):
            node.stop_service(service)
            node.start_service(service)


def mirroring(registry: str, endpoint: str, configs: Mapping[str, Any]) -> dict[str, Any]:
    document = registries_data({"docker.io": [NOWHERE], registry: [endpoint]})
    document["configs"] = dict(configs)
    return document


@pytest.fixture(scope="module")
def access_mesh() -> Iterator[Mesh]:
    with running_mesh(Mesh(WAVE, overrides=FAST_TIMINGS)) as mesh:
        yield mesh


@pytest.fixture(scope="module")
def basic_upstream(access_mesh: Mesh) -> tuple[NetnsHost, DistributionRegistry]:
    host = access_mesh.add_host("basic")
    htpasswd = write_htpasswd(host.dir / "htpasswd", {USER: PASSWORD})
    return host, start_in_netns(host, UpstreamOptions(htpasswd=htpasswd), port=PORT)


def wave_costs_one_image(
    mesh: Mesh, host: NetnsHost, upstream: DistributionRegistry, image: BuiltImage
) -> None:
    sent = SentBytes(host, upstream.port).install()
    before = sent.read()
    outcomes = pull_together(mesh.nodes, image.name, creds=CREDS)
    failed = [o for o in outcomes if o.error is not None]
    assert not failed, failed
    for node in mesh.nodes:
        assert_holds_verified(node, image)
    cost = (sent.read() - before) / image_bytes(image)
    assert cost <= WAVE_BOUND, f"the upstream sent {cost:.2f}x the image"


def test_basic_auth_upstream_is_shared(
    access_mesh: Mesh, basic_upstream: tuple[NetnsHost, DistributionRegistry], tmp_path: Path
) -> None:
    host, upstream = basic_upstream
    registry = f"basic.test:{PORT}"
    image = new_image(tmp_path, "basic", registry, LAYER_SIZE)
    push_image(image, upstream, creds=CREDS, via=host)
    auth = {"auth": {"username": USER, "password": PASSWORD}}
    point_at(access_mesh, mirroring(registry, upstream.url, {upstream.hostport: auth}))
    wave_costs_one_image(access_mesh, host, upstream, image)


def test_token_auth_upstream_over_tls_is_shared(access_mesh: Mesh, tmp_path: Path) -> None:
    host = access_mesh.add_host("token")
    tls = ServerTls.create(host.dir / "pki", ip=host.ip)
    key_files = SigningKey.generate().write(host.dir / "token")
    policy = TokenPolicy(issuer="test-issuer", service="test-registry", users={USER: PASSWORD})
    tokens = start_token_server(host.dir, policy, key_files, host=host)
    options = UpstreamOptions(
        tls=tls, token=TokenAuth(tokens.realm, policy.service, policy.issuer, key_files[0])
    )
    upstream = start_in_netns(host, options, port=PORT)
    registry = f"token.test:{PORT}"
    image = new_image(tmp_path, "token", registry, LAYER_SIZE)
    push_image(image, upstream, creds=CREDS, ca_dir=tls.ca_dir, via=host)
    config = {
        "tls": {"ca_file": str(tls.ca_file)},
        "auth": {"username": USER, "password": PASSWORD},
    }
    point_at(access_mesh, mirroring(registry, upstream.url, {upstream.hostport: config}))
    wave_costs_one_image(access_mesh, host, upstream, image)


def test_wrong_credentials_pull_as_without_peermirror(
    access_mesh: Mesh, basic_upstream: tuple[NetnsHost, DistributionRegistry], tmp_path: Path
) -> None:
    host, upstream = basic_upstream
    registry = f"wrong.test:{PORT}"
    image = new_image(tmp_path, "wrong", registry, LAYER_SIZE)
    push_image(image, upstream, creds=CREDS, via=host)
    wrong = {"auth": {"username": USER, "password": "not-the-password"}}
    point_at(access_mesh, mirroring(registry, upstream.url, {upstream.hostport: wrong}))
    outcomes = pull_together(access_mesh.nodes, image.name, creds=CREDS)
    failed = [o for o in outcomes if o.error is not None]
    assert not failed, failed
    for node in access_mesh.nodes:
        assert_holds_verified(node, image)
        # The mirror missed (a fast 404), so containerd went on to the upstream with the pod's
        # own secret; never an error. (Once a node holds the image, its peers may serve it.)
        # Requests from other nodes' relays are left out: they are answered from local content
        # only, so they are refused until this node holds the image.
        results = {
            str(r["result"])
            for r in node.log_records("registry")
            if r.get("event") == "request"
            and r.get("source") == "external"
            and image.repository in str(r.get("path", ""))
        }
        assert "not_found" in results, results
        assert results <= {"not_found", "peer_hit", "local_hit"}, results


def test_only_the_listed_endpoint_is_fetched_from_without_the_default(tmp_path: Path) -> None:
    no_default = deep_merge(FAST_TIMINGS, {"k3s": {"disable-default-registry-endpoint": True}})
    with running_mesh(Mesh(WAVE, overrides=no_default)) as mesh:
        default_host, listed_host = mesh.add_host("default"), mesh.add_host("listed")
        default = start_in_netns(default_host, port=PORT)
        listed = start_in_netns(listed_host, port=PORT)
        # The image's registry is the default endpoint's own address; both hold the image.
        image = new_image(tmp_path, "listed", default.hostport, LAYER_SIZE)
        push_image(image, default, via=default_host)
        push_image(image, listed, via=listed_host)
        point_at(mesh, mirroring(default.hostport, listed.url, {}))
        default_sent = SentBytes(default_host, PORT).install()
        listed_sent = SentBytes(listed_host, PORT).install()
        before = default_sent.read(), listed_sent.read()

        outcomes = pull_together(mesh.nodes, image.name)

        failed = [o for o in outcomes if o.error is not None]
        assert not failed, failed
        for node in mesh.nodes:
            assert_holds_verified(node, image)
        assert default_sent.read() - before[0] == 0
        assert listed_sent.read() - before[1] <= WAVE_BOUND * image_bytes(image)
