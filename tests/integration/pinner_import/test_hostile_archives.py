"""Hostile air-gap archives against a real pinner: a manifest graph built to explode a naive walk
is imported in bounded time, an archive over the descriptor cap is refused, and the Pinner API
answers all along (the import must never hold the event loop)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from services.common.containerd.client import ContainerdClient
from services.common.genproto.peermirror.pinner.v1 import pinner_pb2, pinner_pb2_grpc
from tests.harness.containerd import ContainerdDaemon
from tests.harness.service_procs import ServiceProcess, cli_argv, free_port, running
from tests.harness.wait import wait_for
from tests.integration.pinner_import.helpers import nested_index_archive

pytestmark = pytest.mark.containerd

# Whole-test bound: a walk that is not bounded fails here instead of hanging the suite.
IMPORT_DEADLINE_S = 60.0
# Per call: a pinner whose event loop is frozen misses it.
CALL_TIMEOUT_S = 5.0
ENDED = (pinner_pb2.IMPORT_RESULT_IMPORTED, pinner_pb2.IMPORT_RESULT_FAILED)


def pinner_config(
    tmp_path: Path, daemon: ContainerdDaemon, namespace: str, **pinner: Any
) -> tuple[Path, str, Path]:
    images = tmp_path / "images"
    images.mkdir()
    address = f"127.0.0.1:{free_port()}"
    data = {
        "node": {"name": "hostile-test", "data_dir": str(tmp_path / "data")},
        "log": {"level": "info", "format": "json"},
        # No registries file: nothing is mirrored, the pinner only imports and pins.
        "registry": {"registries_file": str(tmp_path / "absent-registries.yaml")},
        "tls": {"enabled": False},
        "pinner": {
            "grpc_address": address,
            "metrics_address": "127.0.0.1:0",
            "images_dir": str(images),
            "certs_dir": str(tmp_path / "certs.d"),
            "import_poll_interval": 0.2,
            "import_settle": 0.2,
            **pinner,
        },
        "store": {"containerd_address": daemon.address, "containerd_namespace": namespace},
    }
    path = tmp_path / "peermirror.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, address, images


def finished_import(address: str, proc: ServiceProcess) -> pinner_pb2.ImportState:
    """Poll Status until the one archive's import ended; every call must be answered."""
    calls = 0
    done: list[pinner_pb2.ImportState] = []
    with grpc.insecure_channel(address) as channel:
        stub = pinner_pb2_grpc.PinnerStub(channel)

        def ended() -> bool:
            nonlocal calls
            try:
                reply = stub.Status(pinner_pb2.StatusRequest(), timeout=CALL_TIMEOUT_S)
            except grpc.RpcError as exc:
                if exc.code() is grpc.StatusCode.UNAVAILABLE and calls == 0:
                    return False  # not listening yet
                raise AssertionError(
                    f"Status not answered during the import: {exc.code()} after {calls} calls"
                ) from None
            calls += 1
            done.extend(s for s in reply.imports if s.result in ENDED)
            return bool(done)

        wait_for(
            "the import finished",
            ended,
            IMPORT_DEADLINE_S,
            0.05,
            gone=proc.exited,
            detail=lambda: f"{calls} calls",
        )
    return done[0]


async def test_nested_duplicate_index_imports_in_bounded_time(
    tmp_path: Path, containerd_daemon: ContainerdDaemon, containerd_namespace: str
) -> None:
    config, address, images = pinner_config(tmp_path, containerd_daemon, containerd_namespace)
    name = "registry.example.test/hostile/nested:1"
    # 40**8 paths through 8 small indexes: a walk without a visited set never ends.
    nested_index_archive(tmp_path, images / "nested.tar", name, levels=8, fanout=40)
    with running(cli_argv("pinner", "--config", str(config)), tmp_path, "pinner") as proc:
        state = finished_import(address, proc)
        assert state.result == pinner_pb2.IMPORT_RESULT_IMPORTED, state.error
        assert name in state.images
    client = ContainerdClient(containerd_daemon.address, containerd_namespace)
    try:
        image = await client.get_image(name)
        assert image.labels["io.cri-containerd.pinned"] == "pinned"
    finally:
        await client.close()


async def test_archive_over_the_descriptor_cap_is_refused(
    tmp_path: Path, containerd_daemon: ContainerdDaemon, containerd_namespace: str
) -> None:
    config, address, images = pinner_config(
        tmp_path, containerd_daemon, containerd_namespace, max_import_descriptors=300
    )
    name = "registry.example.test/hostile/wide:1"
    # 400 distinct manifests the archive does not hold: each costs containerd a lookup.
    nested_index_archive(tmp_path, images / "wide.tar", name, levels=2, fanout=2, absent=400)
    with running(cli_argv("pinner", "--config", str(config)), tmp_path, "pinner") as proc:
        state = finished_import(address, proc)
        assert state.result == pinner_pb2.IMPORT_RESULT_FAILED
        assert "pinner.max_import_descriptors" in state.error
    client = ContainerdClient(containerd_daemon.address, containerd_namespace)
    try:
        assert [i.name for i in await client.list_images()] == []
    finally:
        await client.close()
