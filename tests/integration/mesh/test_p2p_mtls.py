"""A peer-to-peer pull over mutual TLS end to end: containerd -> its https mirror -> a peer.

Three real nodes share one cluster CA (`Mesh(tls=True)`). Node 3's containerd reads the hosts.toml
the pinner wrote (https://127.0.0.1:<port> with the CA as `ca` and the node's pair as `client`),
its registry fetches from node 1's registry over mTLS, and discovery runs over mTLS as well. Every
non-mirror endpoint is http://127.0.0.1:9, so a pull that succeeds was served by a peer.
"""

from __future__ import annotations

import ssl
import tomllib
import urllib.request
from collections.abc import Iterator

import pytest

from services.common.tls import client_context
from tests.harness.fixtures_mesh import running_mesh
from tests.harness.images import BuiltImage, build_image
from tests.harness.mesh import DEFAULT_MIRRORS, NOWHERE, Mesh, pull_via_mirror
from tests.harness.mesh_p2p import (
    FAST_TIMINGS,
    PULL_TIMEOUT,
    assert_holds_verified,
    held_digests,
    import_image,
    served_to_peers,
    unique_ref,
    wait_advertised,
)

pytestmark = pytest.mark.containerd


@pytest.fixture(scope="module")
def mtls_mesh() -> Iterator[Mesh]:
    with running_mesh(Mesh(3, overrides=FAST_TIMINGS, tls=True), "mTLS netns mesh") as mesh:
        yield mesh


def test_hosts_toml_names_the_https_mirror_with_the_cluster_ca_and_client_pair(
    mtls_mesh: Mesh,
) -> None:
    n3 = mtls_mesh.nodes[2]
    assert n3.tls is not None
    for registry in DEFAULT_MIRRORS:
        hosts = tomllib.loads((n3.hosts_dir / registry / "hosts.toml").read_text())
        assert hosts["server"] == f"{NOWHERE}/v2"
        mirror = f"https://127.0.0.1:{n3.registry_port}/v2"
        assert set(hosts["host"]) == {mirror}
        entry = hosts["host"][mirror]
        assert entry["ca"] == [str(n3.tls.ca_file)]
        assert entry["client"] == [[str(n3.tls.cert_file), str(n3.tls.key_file)]]


def _get(url: str, context: ssl.SSLContext) -> int:
    """Status of a GET of `url` from the test process with `context`; OSError if no answer."""
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    with opener.open(url, timeout=10) as resp:
        resp.read()
        return int(resp.status)


def test_registry_answers_only_clients_with_a_cluster_certificate(mtls_mesh: Mesh) -> None:
    n1, _, n3 = mtls_mesh.nodes
    assert n1.tls is not None and n3.tls is not None
    assert n1.registry_url.startswith("https://")
    # Node 3's certificate opens node 1's registry, as node 3's registry's fetches do.
    assert _get(f"{n1.registry_url}/v2/", client_context(n3.tls)) == 200
    # Trusting the CA but presenting no certificate: the handshake (or the first read) fails.
    anonymous = ssl.create_default_context(cafile=str(n1.tls.ca_file))
    with pytest.raises(OSError):
        _get(f"{n1.registry_url}/v2/", anonymous)


def test_containerd_pulls_through_its_https_mirror_from_a_peer_over_mtls(
    mtls_mesh: Mesh, tmp_path_factory: pytest.TempPathFactory
) -> None:
    n1, n2, n3 = mtls_mesh.nodes
    image: BuiltImage = build_image(
        tmp_path_factory.mktemp("mtls"), name=unique_ref("mtls"), layers=2, layer_size=300_000
    )
    import_image(n1, image, tmp_path_factory.mktemp("mtls-archive"))
    wait_advertised([n2, n3], image, [n1])
    assert not held_digests(n3) & {d.digest for d in image.blobs}

    before = served_to_peers(n1)
    pull_via_mirror(n3, image.name, timeout=PULL_TIMEOUT)
    after = served_to_peers(n1)

    assert_holds_verified(n3, image)
    # Node 1 answered node 3's registry from its own content: the manifest (a manifest request)
    # and the config and layers (blob requests).
    assert after["manifest"] - before["manifest"] >= 1
    assert after["blob"] - before["blob"] >= len(image.blobs) - 1
