"""Prefetch pieces without containerd: the ingest tally, reference checks, the refusal on an
oci-layout pinner, and the CLI's per-node streaming and exit status against in-process servers."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

import grpc
import pytest

from services.cli.prefetch_cmd import parse_nodes, prefetch_all, short_id, task_state
from services.cli.progress import ProgressView
from services.common.genproto.peermirror.pinner.v1 import pinner_pb2, pinner_pb2_grpc
from services.common.grpc_server import GrpcServer
from services.pinner.api import NO_CONTAINERD, PinnerApi, progress_message
from services.pinner.prefetch import (
    Ingest,
    IngestTally,
    InvalidPrefetchError,
    Phase,
    PrefetchUpdate,
    normalise_reference,
)

IMAGE_ID = "sha256:" + "ab" * 32


def test_tally_counts_active_offsets_and_finished_totals() -> None:
    tally = IngestTally()
    tally.observe([Ingest("layer-a", 10, 100), Ingest("layer-b", 0, 0)])
    assert (tally.bytes_done, tally.bytes_total) == (10, 100)
    tally.observe([Ingest("layer-a", 60, 100), Ingest("layer-b", 30, 0)])
    # An unknown total counts what was written so far.
    assert (tally.bytes_done, tally.bytes_total) == (90, 130)
    # Gone = committed: the expected size (or, unknown, the last offset) is fetched.
    tally.observe([])
    assert (tally.bytes_done, tally.bytes_total) == (130, 130)


def test_tally_ignores_ingests_that_predate_it() -> None:
    tally = IngestTally([Ingest("other-pull", 5, 50)])
    tally.observe([Ingest("other-pull", 40, 50), Ingest("ours", 1, 2)])
    tally.observe([])
    assert (tally.bytes_done, tally.bytes_total) == (2, 2)


def test_references_are_checked_and_normalised() -> None:
    assert normalise_reference("alpine:3.19") == "docker.io/library/alpine:3.19"
    assert normalise_reference("registry.test:5000/app:1") == "registry.test:5000/app:1"
    for bad in ["", "   ", "Bad Ref!"]:
        with pytest.raises(InvalidPrefetchError, match=r"^reference: "):
            normalise_reference(bad)


def test_progress_message_carries_every_field() -> None:
    update = PrefetchUpdate("app:1", Phase.DONE, 7, 7, 1.5, IMAGE_ID, 7)
    assert progress_message(update) == pinner_pb2.PrefetchProgress(
        phase=pinner_pb2.PREFETCH_PHASE_DONE,
        bytes_done=7,
        bytes_total=7,
        elapsed_seconds=1.5,
        image_id=IMAGE_ID,
        image_size=7,
        reference="app:1",
    )


def test_cli_helpers() -> None:
    assert parse_nodes(" a:1, unix:/b.sock,,a:1 ") == ["a:1", "unix:/b.sock"]
    with pytest.raises(ValueError, match="--nodes"):
        parse_nodes(" , ")
    assert short_id(IMAGE_ID) == "image sha256:abababababab"
    state = task_state(
        "n2",
        pinner_pb2.PrefetchProgress(
            phase=pinner_pb2.PREFETCH_PHASE_PULLING, bytes_done=3, bytes_total=9
        ),
    )
    assert (state.phase, state.done, state.total, state.ok) == ("pulling", 3, 9, None)


class FakePinner(PinnerApi):
    """Streams a scripted prefetch: two updates then DONE, or an error status (the CLI asks
    nothing else of a pinner)."""

    def __init__(self, fail: grpc.StatusCode | None = None) -> None:
        super().__init__(None)
        self.fail = fail
        self.asked: list[str] = []

    async def Prefetch(
        self,
        request: pinner_pb2.PrefetchRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[pinner_pb2.PrefetchProgress]:
        self.asked.append(request.reference)
        yield pinner_pb2.PrefetchProgress(phase=pinner_pb2.PREFETCH_PHASE_STARTED)
        yield pinner_pb2.PrefetchProgress(
            phase=pinner_pb2.PREFETCH_PHASE_PULLING, bytes_done=5, bytes_total=10
        )
        if self.fail is not None:
            await context.abort(self.fail, f"reference {request.reference!r}: pull failed")
        yield pinner_pb2.PrefetchProgress(
            phase=pinner_pb2.PREFETCH_PHASE_DONE,
            bytes_done=10,
            bytes_total=10,
            image_id=IMAGE_ID,
            image_size=10,
        )


async def serve(servicer: PinnerApi) -> GrpcServer:
    server = GrpcServer("127.0.0.1:0", name="fake-pinner")
    servicer.register(server)
    await server.start()
    return server


async def test_cli_prefetches_nodes_concurrently_and_reports_each() -> None:
    good, bad = FakePinner(), FakePinner(fail=grpc.StatusCode.NOT_FOUND)
    servers = [await serve(good), await serve(bad)]
    try:
        nodes = [s.bound_address for s in servers]
        out = io.StringIO()
        view = ProgressView(out, nodes, tty=False)
        results = await prefetch_all(nodes, "app:1", view, rpc_timeout=30)
    finally:
        for s in servers:
            await s.stop()
    assert results == [True, False]
    assert good.asked == bad.asked == ["app:1"]
    lines = out.getvalue().splitlines()
    assert f"{nodes[0]}: done: image sha256:abababababab 10 B/10 B 0.0s" in lines
    assert f"{nodes[1]}: FAILED: NOT_FOUND: reference 'app:1': pull failed 5 B/10 B 0.0s" in lines


async def test_prefetch_on_a_pinner_without_containerd_is_refused() -> None:
    server = GrpcServer("127.0.0.1:0", name="oci-layout-pinner")
    PinnerApi(None).register(server)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.bound_address) as channel:
            stub = pinner_pb2_grpc.PinnerStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in stub.Prefetch(pinner_pb2.PrefetchRequest(reference="app:1")):
                    pass
            with pytest.raises(grpc.aio.AioRpcError) as status:
                await stub.Status(pinner_pb2.StatusRequest())
    finally:
        await server.stop()
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert refused.value.details() == NO_CONTAINERD
    assert status.value.code() == grpc.StatusCode.UNIMPLEMENTED
