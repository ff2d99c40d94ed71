"""The docker-compose override the deploy test lays over the repository's docker-compose.yml.

It changes only where the compose node meets this machine: the containerd it uses (socket,
content directory, certs.d), its ports, its peer wiring (the address peers reach it at, the
peer it joins) and the upstream fallback of mirrored registries (127.0.0.1:9, so no pull can
leave the machine). Images, users, capabilities, healthchecks and commands stay as shipped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SERVICES = ("discovery", "registry", "pinner")
# Container paths of deploy/dev/compose-node.yaml that the override points at the test's files.
CONTAINERD_SOCKET = "/run/containerd/containerd.sock"
CONTENT_ROOT = "/var/lib/containerd/io.containerd.content.v1.content"
CERTS_DIR = "/etc/containerd/certs.d"
REGISTRIES_FILE = "/etc/peermirror/registries.yaml"
# Where containerd falls back when the mirror has nothing: nothing listens there.
NOWHERE = "http://127.0.0.1:9"


@dataclass(frozen=True)
class NodePorts:
    """Every port of one compose node: the two peers reach, and the node-local ones."""

    discovery: int
    registry: int
    discovery_local: int
    registry_grpc: int
    pinner_grpc: int
    discovery_metrics: int
    registry_metrics: int
    pinner_metrics: int


def node_environment(ports: NodePorts, address: str, bootstrap: Sequence[str]) -> dict[str, str]:
    """Config overrides (PEERMIRROR_<SECTION>__<KEY>) every service of the node gets."""
    local = "127.0.0.1"
    return {
        "PEERMIRROR_NODE__ADDRESS": address,
        "PEERMIRROR_DISCOVERY__PORT": str(ports.discovery),
        "PEERMIRROR_DISCOVERY__LOCAL_ADDRESS": f"{local}:{ports.discovery_local}",
        "PEERMIRROR_DISCOVERY__METRICS_ADDRESS": f"{local}:{ports.discovery_metrics}",
        "PEERMIRROR_DISCOVERY__BOOTSTRAP_PEERS": ",".join(bootstrap),
        "PEERMIRROR_REGISTRY__PORT": str(ports.registry),
        "PEERMIRROR_REGISTRY__GRPC_ADDRESS": f"{local}:{ports.registry_grpc}",
        "PEERMIRROR_REGISTRY__METRICS_ADDRESS": f"{local}:{ports.registry_metrics}",
        "PEERMIRROR_PINNER__GRPC_ADDRESS": f"{local}:{ports.pinner_grpc}",
        "PEERMIRROR_PINNER__METRICS_ADDRESS": f"{local}:{ports.pinner_metrics}",
        # The mirrored registries' upstream is NOWHERE (registries file below), never the real one.
        "PEERMIRROR_PINNER__DISABLE_DEFAULT_ENDPOINT": "true",
    }


def registries_yaml(registries: Sequence[str]) -> dict[str, Any]:
    """registries.yaml mirroring `registries`, each falling back only to NOWHERE."""
    return {"mirrors": {r: {"endpoint": [NOWHERE]} for r in registries}}


def override_data(
    *,
    environment: Mapping[str, str],
    containerd_socket: Path,
    content_root: Path,
    certs_dir: Path,
    registries_file: Path,
) -> dict[str, Any]:
    """The override document: volumes replace the shipped ones with the same container path."""
    containerd = [
        f"{content_root}:{CONTENT_ROOT}:ro",
        f"{registries_file}:{REGISTRIES_FILE}:ro",
    ]
    volumes = {
        "discovery": [],
        "registry": [f"{containerd_socket}:{CONTAINERD_SOCKET}:ro", *containerd],
        "pinner": [
            f"{containerd_socket}:{CONTAINERD_SOCKET}",
            *containerd,
            f"{certs_dir}:{CERTS_DIR}",
        ],
    }
    services: dict[str, Any] = {}
    for name in SERVICES:
        service: dict[str, Any] = {"environment": dict(environment)}
        if volumes[name]:
            service["volumes"] = volumes[name]
        services[name] = service
    return {"services": services}
