"""A 1 GiB blob streams from a registry process without its memory growing with the blob."""

from __future__ import annotations

import hashlib
import http.client
import os
from pathlib import Path

import grpc
import pytest
import yaml

from services.common.genproto.peermirror.registry.v1 import introspection_pb2 as pb
from services.common.genproto.peermirror.registry.v1 import introspection_pb2_grpc as pb_grpc
from tests.harness.registry_inproc import write_registries_file
from tests.harness.service_procs import (
    NodePorts,
    cli_argv,
    running,
    wait_http_ok,
    write_node_config,
)

pytestmark = pytest.mark.slow

GiB = 1 << 30
MiB = 1 << 20
MAX_GROWTH = 64 * MiB


def write_big_blob(layout: Path, size: int) -> str:
    """A `size`-byte blob in the layout, made of one repeated random MiB (cheap to generate)."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    block = os.urandom(MiB)
    digest = hashlib.sha256()
    tmp = blobs / ".tmp-big"
    with tmp.open("wb") as f:
        for _ in range(size // MiB):
            f.write(block)
            digest.update(block)
    tmp.rename(blobs / digest.hexdigest())
    return "sha256:" + digest.hexdigest()


def _kib_field(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"{field} missing from /proc/{pid}/status")


def _get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, str, int]:
    """GET `path`, reading the body in 1 MiB pieces; returns status, body sha256 and size."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        digest, size = hashlib.sha256(), 0
        while chunk := resp.read(MiB):
            digest.update(chunk)
            size += len(chunk)
        return resp.status, "sha256:" + digest.hexdigest(), size
    finally:
        conn.close()


def test_1gib_blob_streams_with_bounded_server_memory(tmp_path: Path) -> None:
    ports = NodePorts.pick()
    config = write_node_config(tmp_path, ports)
    data = yaml.safe_load(config.read_text())
    layout = Path(data["store"]["oci_layout_path"])
    data["registry"]["registries_file"] = str(
        write_registries_file(tmp_path / "registries.yaml", ["docker.io"])
    )
    config.write_text(yaml.safe_dump(data))
    digest = write_big_blob(layout, GiB)
    small = write_big_blob(layout, MiB)
    path = f"/v2/big/blob/blobs/{digest}?ns=docker.io"

    with running(cli_argv("registry", "--config", str(config)), tmp_path / "logs", "r") as proc:
        wait_http_ok(f"{ports.registry_url}/readyz")
        # Warm up every code path the big transfer takes, so imports and buffers are in place.
        assert _get(ports.registry_http, f"/v2/big/blob/blobs/{small}?ns=docker.io")[0] == 200
        assert _get(ports.registry_http, path, {"Range": "bytes=0-1048575"})[0] == 206
        before = _kib_field(proc.pid, "VmRSS")

        status, got, size = _get(ports.registry_http, path)
        assert (status, got, size) == (200, digest, GiB)
        peak = _kib_field(proc.pid, "VmHWM")
        assert peak - before < MAX_GROWTH, f"RSS grew by {(peak - before) / MiB:.1f} MiB"
        # The service's node-local introspection saw the bytes go out.
        with grpc.insecure_channel(ports.grpc_address("registry")) as channel:
            stats = pb_grpc.RegistryIntrospectionStub(channel).Stats(pb.StatsRequest(), timeout=5)
        assert stats.bytes_served_local == GiB + 2 * MiB
        assert stats.in_flight == 0
        assert proc.terminate() == 0
