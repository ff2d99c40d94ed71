"""`peermirror prefetch` on three real nodes: node 1 holds an image, the CLI warms nodes 2 and 3
from it through their own containerd and mirror, and their later pulls are local hits.

The proof is each node's registry /metrics: the prefetch moves `cache="peer_hit"` (fetched from
node 1), the pull after it only `cache="hit"` (served from the node's own containerd).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import grpc
import pytest

from services.common.genproto.peermirror.pinner.v1 import pinner_pb2, pinner_pb2_grpc
from tests.harness.fixtures_mesh import running_mesh
from tests.harness.images import BuiltImage, build_image
from tests.harness.mesh import Mesh, MeshNode, pull_via_mirror
from tests.harness.mesh_p2p import (
    FAST_TIMINGS,
    PULL_TIMEOUT,
    assert_holds_verified,
    import_image,
    served_to_peers,
    unique_ref,
    wait_advertised,
)
from tests.harness.metrics_scrape import Samples
from tests.harness.service_procs import REPO_ROOT, http_get

pytestmark = pytest.mark.containerd

REQUESTS = "peermirror_mirror_requests_total"


@pytest.fixture(scope="module")
def prefetch_mesh() -> Iterator[Mesh]:
    with running_mesh(Mesh(3, overrides=FAST_TIMINGS)) as mesh:
        yield mesh


@pytest.fixture(scope="module")
def seeded(prefetch_mesh: Mesh, tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    """A two-layer image held by node 1 only, advertised to nodes 2 and 3."""
    n1, n2, n3 = prefetch_mesh.nodes
    scratch = tmp_path_factory.mktemp("prefetch")
    image = build_image(scratch, name=unique_ref("prefetch"), layers=2, layer_size=300_000)
    import_image(n1, image, scratch)
    wait_advertised([n2, n3], image, [n1])
    return image


def scrape(node: MeshNode) -> Samples:
    status, body = http_get(f"{node.registry_url}/metrics", timeout=10.0)
    assert status == 200, body[:200]
    return Samples.parse(body.decode())


def moved(before: Samples, after: Samples, **labels: str) -> float:
    return after.value(REQUESTS, **labels) - before.value(REQUESTS, **labels)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=PULL_TIMEOUT,
        check=False,
    )


def test_prefetch_warms_two_nodes_whose_pulls_then_hit_locally(
    prefetch_mesh: Mesh, seeded: BuiltImage
) -> None:
    n1, n2, n3 = prefetch_mesh.nodes
    targets = [n2, n3]
    served_before = {n.name: served_to_peers(n) for n in prefetch_mesh.nodes}
    before = {n.name: scrape(n) for n in targets}

    result = run_cli(
        "prefetch", seeded.name, "--nodes", ",".join(n.grpc_address("pinner") for n in targets)
    )
    assert result.returncode == 0, result.stdout + result.stderr

    # Not a terminal: plain lines, each node's last one saying done with the image's size.
    for node in targets:
        lines = [
            ln for ln in result.stdout.splitlines() if ln.startswith(node.grpc_address("pinner"))
        ]
        assert lines, result.stdout
        assert ": done: image sha256:" in lines[-1], lines[-1]
        assert "\x1b[" not in result.stdout
    # Both nodes now hold the complete image, and node 1 served it to them.
    for node in targets:
        assert_holds_verified(node, seeded)
    # Node 1 served the content; a node warmed first may have served the other some of it.
    served = {n.name: served_to_peers(n) for n in prefetch_mesh.nodes}
    assert served[n1.name]["blob"] > served_before[n1.name]["blob"]
    # Config and layers (every blob but the manifest), once per warmed node.
    fetched = sum(s["blob"] - served_before[name]["blob"] for name, s in served.items())
    assert fetched >= len(targets) * (len(seeded.blobs) - 1)
    warmed = {n.name: scrape(n) for n in targets}
    for node in targets:
        assert moved(before[node.name], warmed[node.name], cache="peer_hit") > 0, node.name

    # A pull through each node's own mirror after the prefetch is answered locally only.
    for node in targets:
        pull_via_mirror(node, seeded.name)
        after = scrape(node)
        assert moved(warmed[node.name], after, cache="hit", kind="manifest") >= 1, node.name
        assert moved(warmed[node.name], after, cache="peer_hit") == 0, node.name
        assert moved(warmed[node.name], after, cache="miss") == 0, node.name


def test_prefetch_errors_name_the_field(prefetch_mesh: Mesh, seeded: BuiltImage) -> None:
    n2 = prefetch_mesh.nodes[1]
    with grpc.insecure_channel(n2.grpc_address("pinner")) as channel:
        stub = pinner_pb2_grpc.PinnerStub(channel)
        with pytest.raises(grpc.RpcError) as empty:
            list(stub.Prefetch(pinner_pb2.PrefetchRequest(reference=""), timeout=30))
        assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "reference" in (empty.value.details() or "")

        with pytest.raises(grpc.RpcError) as malformed:
            list(stub.Prefetch(pinner_pb2.PrefetchRequest(reference="Bad Ref!"), timeout=30))
        assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "reference" in (malformed.value.details() or "")

    # Nobody holds this image and every other endpoint is dead: the CLI reports the node failed.
    missing = unique_ref("prefetch-missing")
    result = run_cli("prefetch", missing, "--nodes", n2.grpc_address("pinner"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED" in result.stdout
    assert missing in result.stdout
    assert "1 of 1 node(s) failed" in result.stderr
