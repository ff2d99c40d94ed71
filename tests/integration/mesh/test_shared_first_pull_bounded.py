"""A wave larger than one holder may serve: several nodes fetch each blob, none serves too many.

Five nodes (real containerd each, CRI) pull a new image at once with
`inflight.max_waiters_per_fetch: 1`: a blob's lease holder is joined by a second holder once
one node waits for it, so the upstream answers a blob more than once (never more than a holder
per two nodes) and every pull completes and verifies, whichever holder a node relayed from.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.first_pull_wave import (
    Upstream,
    manifest_gets,
    pull_together,
    push_new_image,
    start_counted_upstream,
)
from tests.harness.fixtures_mesh import running_mesh
from tests.harness.mesh import Mesh
from tests.harness.mesh_p2p import FAST_TIMINGS, assert_holds_verified

pytestmark = pytest.mark.containerd

NODES = 5
MAX_WAITERS = 1
# Each holder serves at most one other node: at most this many fetches of a blob.
MOST_FETCHES = -(-NODES // (MAX_WAITERS + 1))


@pytest.fixture(scope="module")
def bounded_mesh() -> Iterator[tuple[Mesh, Upstream]]:
    overrides = {**FAST_TIMINGS, "inflight": {"max_waiters_per_fetch": MAX_WAITERS}}
    with running_mesh(Mesh(NODES, overrides=overrides)) as mesh:
        yield mesh, start_counted_upstream(mesh)


def test_a_wave_past_the_bound_fetches_a_blob_more_than_once_and_every_pull_verifies(
    bounded_mesh: tuple[Mesh, Upstream], tmp_path: Path
) -> None:
    mesh, upstream = bounded_mesh
    image = push_new_image(upstream, tmp_path, "bounded")

    outcomes = pull_together(mesh.nodes, image.name)

    failed = [o for o in outcomes if o.error is not None]
    assert not failed, failed
    for node in mesh.nodes:
        assert_holds_verified(node, image)
    repository = image.name.split("/", 1)[1].rpartition(":")[0]
    fetches = Counter(
        str(r["http.request.uri"]).split("?", 1)[0].rsplit("/", 1)[1]
        for r in upstream.registry.requests("GET", f"/v2/{repository}/blobs/")
    )
    assert set(fetches) <= {d.digest for d in image.blobs}, fetches
    assert max(fetches.values()) <= MOST_FETCHES, fetches
    # Five nodes asking at once: some blob's first holder had its one waiter, so another node
    # fetched it too.
    assert sum(fetches.values()) > len(fetches), fetches
    # Manifests are not bounded: one upstream request for the tag, whatever the wave.
    assert manifest_gets(upstream, image) == 1
