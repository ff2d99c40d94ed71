"""One test node (registry, discovery, pinner as real processes) with an image and tight limits."""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml

from services.common.oci.synthetic import BuiltImage, build_image
from tests.harness.registry_inproc import write_registries_file
from tests.harness.service_procs import (
    NodePorts,
    ServiceProcess,
    cli_argv,
    running,
    wait_http_ok,
    wait_serving,
    write_node_config,
)

IMAGE = "docker.io/library/fuzz:1.0"
# Short enough that a slow client is cut off within a test, long enough for a loaded machine.
REQUEST_TIMEOUT_S = 2.0
KEEP_ALIVE_TIMEOUT_S = 2.0


@dataclass
class FuzzNode:
    """The running services of one node and the image its registry serves."""

    ports: NodePorts
    image: BuiltImage
    procs: dict[str, ServiceProcess]

    def rss(self, service: str) -> int:
        """Resident memory of `service`'s process in bytes."""
        return int(psutil.Process(self.procs[service].pid).memory_info().rss)

    def alive(self, service: str) -> bool:
        return self.procs[service].proc.poll() is None


def raise_open_files(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards `wanted` (children inherit it);
    returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def write_limited_config(directory: Path, ports: NodePorts, registry: Mapping[str, Any]) -> Path:
    """The harness node config with docker.io mirrored, short timeouts and `registry` overrides."""
    path = write_node_config(directory, ports)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["registry"].update(
        {
            "registries_file": str(
                write_registries_file(directory / "registries.yaml", ["docker.io"])
            ),
            "request_timeout": REQUEST_TIMEOUT_S,
            "keep_alive_timeout": KEEP_ALIVE_TIMEOUT_S,
            # Local content only: a miss must never make this node dial anything.
            "peer_fetch": False,
            **registry,
        }
    )
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@contextlib.contextmanager
def fuzz_node(
    directory: Path,
    services: tuple[str, ...] = ("registry",),
    registry: Mapping[str, Any] | None = None,
) -> Iterator[FuzzNode]:
    """Start `services` on one config (OCI-layout store holding IMAGE); all gone on exit."""
    ports = NodePorts.pick()
    config = write_limited_config(directory, ports, registry or {})
    image = build_image(directory / "oci-layout", name=IMAGE, layers=2, layer_size=32 * 1024)
    with contextlib.ExitStack() as stack:
        procs: dict[str, ServiceProcess] = {}
        for service in services:
            procs[service] = stack.enter_context(
                running(cli_argv(service, "--config", str(config)), directory / "logs", service)
            )
        for service, proc in procs.items():
            wait_serving(ports.grpc_address(service), proc)
        if "registry" in procs:
            wait_http_ok(f"{ports.registry_url}/readyz")
        yield FuzzNode(ports, image, procs)
