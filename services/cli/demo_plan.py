"""The local mesh's plan and report (`peermirror demo`), kept pure: ports, node configs, who
served what, and the summary text. The processes and the pull live in `demo_mesh`."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

from services.common.hostport import join_host_port
from services.common.units import format_bytes

LOOPBACK = "127.0.0.1"
DEFAULT_BASE_PORT = 15000
DEFAULT_NODES = 3
MAX_NODES = 99
# Node i's k-th listener sits at base + i + 100*k (see Listener), so node numbers read off
# the ports.
PORT_STRIDE = 100
DEMO_IMAGE = "docker.io/library/peermirror-demo:1.0"
# Every registry is mirrored: the demo image's docker.io, and whatever an operator pulls next.
REGISTRIES_YAML = '# Written by `peermirror demo`: mirror every registry.\nmirrors:\n  "*": {}\n'


class Listener(IntEnum):
    """One loopback listener of a mesh node; its value is the block of PORT_STRIDE ports it
    takes its port from (node i's is at base + PORT_STRIDE * value + i)."""

    REGISTRY = 0
    REGISTRY_GRPC = 1
    DISCOVERY = 2
    DISCOVERY_LOCAL = 3
    PINNER_GRPC = 4
    REGISTRY_METRICS = 5
    DISCOVERY_METRICS = 6
    PINNER_METRICS = 7


PORTS_PER_NODE = len(Listener)


@dataclass(frozen=True)
class NodePlan:
    """Where one mesh node lives: its directory and its loopback ports (one per Listener)."""

    number: int
    directory: Path
    base_port: int

    @property
    def name(self) -> str:
        return f"node{self.number}"

    def port(self, listener: Listener) -> int:
        return self.base_port + PORT_STRIDE * listener + self.number

    def address(self, listener: Listener) -> str:
        """`host:port` of `listener`, for a config key or a client."""
        return join_host_port(LOOPBACK, self.port(listener))

    @property
    def registry_url(self) -> str:
        return f"http://{self.address(Listener.REGISTRY)}"

    @property
    def ports(self) -> tuple[int, ...]:
        return tuple(self.port(listener) for listener in Listener)

    @property
    def config_path(self) -> Path:
        return self.directory / "node.yaml"

    @property
    def layout_path(self) -> Path:
        return self.directory / "oci-layout"


def plan_mesh(nodes: int, base_port: int, workdir: Path) -> list[NodePlan]:
    """The nodes of a mesh of `nodes` nodes; ValueError when the numbers do not fit."""
    if not 2 <= nodes <= MAX_NODES:
        raise ValueError(f"--nodes must be between 2 and {MAX_NODES}, got {nodes}")
    highest = base_port + (PORTS_PER_NODE - 1) * PORT_STRIDE + nodes
    if base_port < 1024 or highest > 65535:
        raise ValueError(
            f"--base-port {base_port} needs ports {base_port + 1}..{highest}: "
            "use a base between 1024 and " + str(65535 - (PORTS_PER_NODE - 1) * PORT_STRIDE - nodes)
        )
    return [NodePlan(i, workdir / f"node{i}", base_port) for i in range(1, nodes + 1)]


def node_config(node: NodePlan, seed: NodePlan, registries_file: Path) -> dict[str, Any]:
    """The YAML data of `node`'s config: loopback only, OCI-layout store, no containerd, no
    root; every node but `seed` joins through `seed`'s discovery."""
    return {
        "node": {
            "name": node.name,
            "data_dir": str(node.directory / "data"),
            "address": LOOPBACK,
        },
        "log": {"level": "info", "format": "json"},
        "registry": {
            "host": LOOPBACK,
            "port": node.port(Listener.REGISTRY),
            "grpc_address": node.address(Listener.REGISTRY_GRPC),
            "registries_file": str(registries_file),
            # skopeo and plain HTTP clients send no `ns`: they are pulling docker.io images.
            "default_registry": "docker.io",
            # Two shared cores may be busy: give a cold lookup and a peer's first bytes time
            # (the defaults are tuned for a quiet cluster, where a miss must be fast).
            "resolve_timeout": 2.0,
            "header_timeout": 1.0,
            "peer_timeout": 10.0,
            "metrics_address": node.address(Listener.REGISTRY_METRICS),
        },
        # The demo runs on one host's loopback: plain HTTP and plaintext gRPC, said in the log.
        "tls": {"enabled": False},
        "discovery": {
            "host": LOOPBACK,
            "port": node.port(Listener.DISCOVERY),
            "local_address": node.address(Listener.DISCOVERY_LOCAL),
            "bootstrap_peers": (
                [] if node.number == seed.number else [seed.address(Listener.DISCOVERY)]
            ),
            "metrics_address": node.address(Listener.DISCOVERY_METRICS),
        },
        "pinner": {
            "grpc_address": node.address(Listener.PINNER_GRPC),
            "images_dir": str(node.directory / "images"),
            "certs_dir": str(node.directory / "certs.d"),
            # No containerd reads these: nothing to write, and the registry speaks plain HTTP.
            "mirror_tls": False,
            "write_hosts": False,
            "metrics_address": node.address(Listener.PINNER_METRICS),
        },
        "store": {"backend": "oci-layout", "oci_layout_path": str(node.layout_path)},
    }


def repository_path(image: str) -> tuple[str, str]:
    """(`<repo>`, `<tag>`) as a client sends them for docker.io image `image` without `ns`."""
    registry, slash, rest = image.partition("/")
    repo, colon, tag = rest.rpartition(":")
    if registry != "docker.io" or not slash or not colon or not repo or "/" in tag:
        raise ValueError(f"expected docker.io/<repo>:<tag>, got {image!r}")
    return repo, tag


# --- who served what ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PulledItem:
    """One manifest or blob the client received."""

    kind: str  # "index", "manifest", "config" or "layer"
    digest: str
    size: int
    verified: bool


@dataclass(frozen=True)
class ServedItem(PulledItem):
    """One piece of content the client received, and which nodes answered it."""

    served_by: tuple[str, ...]


def servers_of(
    providers: Collection[str], answered_peers: Collection[str], puller: str
) -> tuple[str, ...]:
    """Which nodes served one piece of content to the puller's registry.

    `providers` are the nodes discovery named for its digest; `answered_peers` those whose peer
    request counters for that kind of content went up during the pull. Content no peer served
    was answered by the puller's own store.
    """
    found = tuple(sorted((set(providers) & set(answered_peers)), key=_node_order))
    return found if found else (puller,)


def _node_order(name: str) -> tuple[int, str]:
    digits = name.removeprefix("node")
    return (int(digits), name) if digits.isdigit() else (1 << 30, name)


def counter_deltas(
    before: Mapping[str, Mapping[str, int]], after: Mapping[str, Mapping[str, int]]
) -> dict[str, dict[str, int]]:
    """Per node, how much each counter grew between two snapshots."""
    return {
        node: {key: value - before.get(node, {}).get(key, 0) for key, value in counters.items()}
        for node, counters in after.items()
    }


def answered(deltas: Mapping[str, Mapping[str, int]], counter: str) -> list[str]:
    """Nodes whose `counter` grew."""
    return sorted((n for n, c in deltas.items() if c.get(counter, 0) > 0), key=_node_order)


def peer_servers(
    deltas: Mapping[str, Mapping[str, int]], puller: str
) -> list[tuple[str, int, int]]:
    """(node, peer requests answered, bytes sent) of every node but `puller` that answered
    peer requests."""
    out: list[tuple[str, int, int]] = []
    for node in sorted(deltas, key=_node_order):
        counters = deltas[node]
        requests = counters.get("manifest_peer", 0) + counters.get("blob_peer", 0)
        if node != puller and requests > 0:
            out.append((node, requests, counters.get("bytes_served_local", 0)))
    return out


# --- the report --------------------------------------------------------------------------------


def short_digest(digest: str) -> str:
    """`sha256:0123456789abcdef...` -> `sha256:0123456789ab`."""
    algorithm, _, encoded = digest.partition(":")
    return f"{algorithm}:{encoded[:12]}"


@dataclass(frozen=True)
class PullReport:
    """Everything the summary shows about one pull through the mesh."""

    image: str
    seed: str
    puller: str
    puller_url: str
    client: str
    seconds: float
    items: Sequence[ServedItem]
    relayed_bytes: int
    # (node, peer requests answered, bytes sent) for each node that answered the puller.
    peers: Sequence[tuple[str, int, int]] = ()


def render_summary(report: PullReport) -> list[str]:
    """The lines printed after the pull."""
    total = sum(item.size for item in report.items)
    rate = total / report.seconds if report.seconds > 0 else 0.0
    lines = [
        f"pulled {report.image} (seeded on {report.seed} only) through {report.puller}'s "
        f"registry {report.puller_url} with {report.client}",
        f"  {'kind':<8} {'digest':<19} {'size':>10}  served by",
    ]
    for item in report.items:
        check = "verified" if item.verified else "DIGEST MISMATCH"
        lines.append(
            f"  {item.kind:<8} {short_digest(item.digest):<19} {format_bytes(item.size):>10}  "
            f"{', '.join(item.served_by)}  {check}"
        )
    lines.append(
        f"  total {format_bytes(total)} in {report.seconds:.2f} s "
        f"({format_bytes(rate)}/s); {report.puller} relayed {format_bytes(report.relayed_bytes)} "
        "from peers"
    )
    for node, requests, sent in report.peers:
        lines.append(f"  {node} answered {requests} peer requests, sending {format_bytes(sent)}")
    blobs = sum(1 for i in report.items if i.kind in ("config", "layer"))
    manifests = len(report.items) - blobs
    bad = [i for i in report.items if not i.verified]
    if bad:
        lines.append(f"  {len(bad)} of {len(report.items)} items FAILED verification")
    else:
        lines.append(f"  all {_count(blobs, 'blob')} and {_count(manifests, 'manifest')} verified")
    return lines


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def render_mesh_up(nodes: Iterable[NodePlan], logs: Path) -> list[str]:
    """The lines saying where the running mesh can be reached."""
    urls = ", ".join(f"{n.name} {n.registry_url}" for n in nodes)
    return [f"mesh is up: {urls}", f"logs: {logs}/node*/*.log; Ctrl-C to stop"]
