"""The Pinner gRPC API and the `peermirror pins|pin|unpin` CLI on a loopback server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from services.common.genproto.peermirror.pinner.v1 import pinner_pb2, pinner_pb2_grpc
from services.common.grpc_server import GrpcServer
from services.pinner.airgap import AirgapManager
from services.pinner.api import PinnerApi, SyncOutcome, SyncState
from tests.harness.containerd import ContainerdDaemon
from tests.harness.service_procs import run_cli
from tests.integration.pinner_import.helpers import MANAGED, PIN, manager, oci_archive

pytestmark = pytest.mark.containerd

IMPORTED = "registry.example.test/api:1"


@pytest.fixture
async def served(
    tmp_path: Path, containerd_daemon: ContainerdDaemon, containerd_namespace: str
) -> AsyncIterator[tuple[AirgapManager, str, list[int]]]:
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    oci_archive(tmp_path, images_dir, IMPORTED, ".tar")
    resyncs: list[int] = []

    async def resync() -> SyncOutcome:
        resyncs.append(1)
        return SyncOutcome(advertised=7, withdrawn=2)

    async with manager(containerd_daemon.address, containerd_namespace, images_dir) as airgap:
        await airgap.start()
        server = GrpcServer("127.0.0.1:0", name="pinner-test")
        PinnerApi(
            airgap.pins,
            airgap=airgap,
            sync_state=lambda: SyncState(participating=True, advertised_keys=42),
            resync=resync,
        ).register(server)
        await server.start()
        try:
            yield airgap, server.bound_address, resyncs
        finally:
            await server.stop(grace=None)


async def test_api_lists_pins_pins_and_unpins(
    served: tuple[AirgapManager, str, list[int]], containerd_daemon: ContainerdDaemon
) -> None:
    airgap, address, resyncs = served
    # An image that is present but not pinned, as kubelet's pulls leave them.
    image = await airgap.client.get_image(IMPORTED)
    await airgap.client.create_image("docker.io/library/plain:1", image.target)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pinner_pb2_grpc.PinnerStub(channel)
        pins = (await stub.ListPins(pinner_pb2.ListPinsRequest())).pins
        assert [p.name for p in pins] == sorted(
            [IMPORTED, f"registry.example.test/api@{image.target.digest}"]
        )
        assert all(p.managed and p.source.endswith("api-1.tar") for p in pins)

        # Short Docker names are normalised as containerd does.
        pinned = (await stub.Pin(pinner_pb2.PinRequest(ref="plain:1"))).pin
        assert pinned.name == "docker.io/library/plain:1"
        assert not pinned.managed
        labels = (await airgap.client.get_image("docker.io/library/plain:1")).labels
        assert labels[PIN] == "pinned" and MANAGED not in labels

        assert (await stub.Unpin(pinner_pb2.UnpinRequest(ref=IMPORTED))).was_pinned
        labels = (await airgap.client.get_image(IMPORTED)).labels
        assert PIN not in labels and MANAGED not in labels
        assert not (await stub.Unpin(pinner_pb2.UnpinRequest(ref=IMPORTED))).was_pinned

        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.Pin(pinner_pb2.PinRequest(ref="docker.io/library/absent:1"))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await stub.Pin(pinner_pb2.PinRequest(ref="Not A Ref"))
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        status = await stub.Status(pinner_pb2.StatusRequest())
        assert status.participating and status.advertised_keys == 42
        assert status.namespace == airgap.client.namespace
        assert status.pinned_images == 2
        [state] = status.imports
        assert state.result == pinner_pb2.IMPORT_RESULT_IMPORTED
        assert IMPORTED in state.images

        outcome = await stub.Resync(pinner_pb2.ResyncRequest())
        assert (outcome.advertised, outcome.withdrawn, outcome.imported) == (7, 2, 0)
        assert resyncs == [1]


async def test_cli_pins_pin_unpin(
    served: tuple[AirgapManager, str, list[int]], containerd_daemon: ContainerdDaemon
) -> None:
    airgap, address, _ = served
    image = await airgap.client.get_image(IMPORTED)
    await airgap.client.create_image("docker.io/library/cli:1", image.target)

    code, out, _ = await run_cli("pin", "cli:1", "--address", address)
    assert code == 0 and "docker.io/library/cli:1" in out
    code, out, _ = await run_cli("pins", "--address", address)
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert rows["docker.io/library/cli:1"][2] == "manual"
    assert rows[IMPORTED][2] == "managed"
    assert rows[IMPORTED][3].endswith("api-1.tar")

    code, out, _ = await run_cli("unpin", "docker.io/library/cli:1", "--address", address)
    assert code == 0 and "unpinned" in out
    assert PIN not in (await airgap.client.get_image("docker.io/library/cli:1")).labels

    code, _, err = await run_cli("pin", "docker.io/library/absent:1", "--address", address)
    assert code == 3 and "NOT_FOUND" in err
