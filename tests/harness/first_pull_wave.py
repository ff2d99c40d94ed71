"""A wave of first pulls: a counted upstream in its own namespace, a new image pushed to it,
and CRI pulls started on several nodes at the same moment (tests and bench.first_pull)."""

from __future__ import annotations

import threading
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.harness.images import BuiltImage, build_image
from tests.harness.mesh import NOWHERE, Mesh, MeshNode, NetnsHost, registries_data
from tests.harness.mesh_p2p import PULL_TIMEOUT, cri_pull, unique_ref
from tests.harness.upstream import DistributionRegistry, SentBytes, push_image, start_in_netns

UPSTREAM_PORT = 5000
# The registry name every node's registries.yaml mirrors to the upstream namespace.
MIRRORED = "registry.test:5000"
LAYERS = 4
LAYER_SIZE = 128 * 1024 * 1024  # a 512 MiB image


@dataclass
class Upstream:
    """The upstream registry, its namespace and the kernel's count of what it sent."""

    host: NetnsHost
    registry: DistributionRegistry
    sent: SentBytes


def start_counted_upstream(mesh: Mesh) -> Upstream:
    """docker-registry in a namespace of its own, its sent bytes counted, every node's
    registries.yaml pointing `registry.test:5000` at it."""
    host = mesh.add_host("upstream")
    registry = start_in_netns(host, port=UPSTREAM_PORT)
    sent = SentBytes(host, UPSTREAM_PORT).install()
    point_mirrors_at(mesh, host)
    return Upstream(host, registry, sent)


def point_mirrors_at(mesh: Mesh, upstream: NetnsHost) -> None:
    """Every node's registries.yaml names the upstream as `registry.test:5000`'s endpoint; the
    pinners are restarted to write hosts.toml from it."""
    endpoint = f"http://{upstream.ip}:{UPSTREAM_PORT}"
    mirrors = {"docker.io": [NOWHERE], MIRRORED: [endpoint]}
    for node in mesh.nodes:
        path = Path(node.config["registry"]["registries_file"])
        path.write_text(yaml.safe_dump(registries_data(mirrors), sort_keys=False))
        node.stop_service("pinner")
        node.start_service("pinner")
        hosts = tomllib.loads((node.hosts_dir / MIRRORED / "hosts.toml").read_text())
        # containerd may dial its own mirror and the upstream namespace, nothing else.
        assert hosts["server"] == f"{endpoint}/v2"
        scheme = "http" if node.tls is None else "https"
        assert set(hosts["host"]) == {f"{scheme}://127.0.0.1:{node.registry_port}/v2"}


def push_new_image(
    upstream: Upstream, scratch: Path, stem: str, layer_size: int = LAYER_SIZE
) -> BuiltImage:
    """A 4-layer image no node has seen, pushed into the upstream with skopeo."""
    image = new_image(scratch, stem, MIRRORED, layer_size)
    push_image(image, upstream.registry, via=upstream.host)
    return image


def new_image(scratch: Path, stem: str, registry: str, layer_size: int = LAYER_SIZE) -> BuiltImage:
    """A 4-layer image named under `registry` that no node has seen (cheap to build: its
    layers are stored, not compressed)."""
    return build_image(
        scratch / "img",
        name=unique_ref(stem, registry=registry),
        layers=LAYERS,
        layer_size=layer_size,
        cheap_data=True,
        compresslevel=0,
    )


def image_bytes(image: BuiltImage) -> int:
    return sum(desc.size for desc in image.blobs)


def manifest_gets(upstream: Upstream, image: BuiltImage) -> int:
    """GETs the upstream answered for `image`'s manifest, by tag or by digest."""
    repository, _, tag = image.name.split("/", 1)[1].rpartition(":")
    prefix = f"/v2/{repository}/manifests/"
    refs = {f"{prefix}{tag}", f"{prefix}{image.target.digest}"}
    return sum(
        1
        for r in upstream.registry.requests("GET", prefix)
        if str(r["http.request.uri"]).split("?", 1)[0] in refs
    )


@dataclass
class PullOutcome:
    """One node's pull in a wave."""

    node: str
    seconds: float
    error: str | None


def pull_together(
    nodes: Sequence[MeshNode],
    ref: str,
    timeout: float = PULL_TIMEOUT,
    creds: tuple[str, str] | None = None,
) -> list[PullOutcome]:
    """CRI PullImage of `ref` on every node, released by one barrier so they start within
    milliseconds of each other; returns each node's outcome (errors are kept, not raised)."""
    barrier = threading.Barrier(len(nodes))
    outcomes: list[PullOutcome | None] = [None] * len(nodes)

    def pull(i: int, node: MeshNode) -> None:
        barrier.wait()
        start = time.monotonic()
        error = None
        try:
            cri_pull(node, ref, timeout=timeout, creds=creds)
        except Exception as exc:  # reported by the caller, with every other node's outcome
            error = f"{type(exc).__name__}: {exc}"
        outcomes[i] = PullOutcome(node.name, time.monotonic() - start, error)

    threads = [threading.Thread(target=pull, args=(i, n)) for i, n in enumerate(nodes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 30)
    return [
        o if o is not None else PullOutcome(n.name, timeout, "hung")
        for o, n in zip(outcomes, nodes, strict=True)
    ]
