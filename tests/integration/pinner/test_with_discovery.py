"""The pinner against the real discovery service (a `peermirror discovery` process): what the
node holds is listed by discovery's node-local API, and comes back after discovery restarts."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import grpc
import pytest

from services.common.config import load_config
from services.common.genproto.peermirror.discovery.v1 import local_pb2, local_pb2_grpc
from services.pinner.service import PinnerRuntime, prepare
from tests.harness.containerd import ContainerdDaemon
from tests.harness.containerd_store_factory import import_image
from tests.harness.images import build_image
from tests.harness.service_procs import (
    NodePorts,
    cli_argv,
    running,
    wait_serving,
    write_node_config,
)
from tests.harness.wait import wait_until

pytestmark = pytest.mark.containerd

WAIT_S = 30.0


async def advertised(address: str) -> set[str]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = local_pb2_grpc.LocalDiscoveryStub(channel)
        keys: set[str] = set()
        async for resp in stub.ListAdvertised(local_pb2.ListAdvertisedRequest(), timeout=5):
            keys.update(resp.keys)
        return keys


async def wait_advertised(address: str, want: set[str]) -> None:
    async def listed() -> bool:
        try:
            return await advertised(address) == want
        except grpc.aio.AioRpcError:
            return False  # discovery restarting

    await wait_until(listed, WAIT_S, 0.1, what=f"{len(want)} keys advertised")


async def test_advertised_through_real_discovery_and_again_after_its_restart(
    tmp_path: Path, containerd_daemon: ContainerdDaemon, containerd_namespace: str
) -> None:
    ports = NodePorts.pick()
    config_path = write_node_config(tmp_path, ports)
    registries = tmp_path / "registries.yaml"
    registries.write_text("mirrors:\n  docker.io: {}\n")
    base = load_config(config_path, {})
    cfg = dataclasses.replace(
        base,
        registry=dataclasses.replace(base.registry, registries_file=registries),
        store=dataclasses.replace(
            base.store,
            backend="containerd",
            containerd_address=containerd_daemon.address,
            containerd_namespace=containerd_namespace,
        ),
    )
    local = ports.grpc_address("discovery")
    image = build_image(tmp_path / "img", "docker.io/library/real:1", layers=2, layer_size=1024)
    want = {b.digest for b in image.blobs} | {image.name}
    argv = cli_argv("discovery", "--config", str(config_path))
    runtime = PinnerRuntime(cfg, prepare(cfg), airgap=False)
    runtime.start()
    try:
        with running(argv, tmp_path / "logs", "discovery-1") as first:
            await asyncio.to_thread(wait_serving, local, first)
            await import_image(containerd_daemon, containerd_namespace, image)
            await wait_advertised(local, want)
            assert await asyncio.to_thread(first.terminate, 5.0) == 0
        with running(argv, tmp_path / "logs", "discovery-2") as second:
            await asyncio.to_thread(wait_serving, local, second)
            # A fresh discovery knows nothing; the pinner notices and advertises again.
            await wait_advertised(local, want)
            assert runtime.running
    finally:
        await runtime.stop()
