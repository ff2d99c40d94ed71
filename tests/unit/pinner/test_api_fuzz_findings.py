"""Regressions for what fuzzing the containerd-backed Pinner API found: an invalid `ref` named in
the message, image ids refused by Prefetch before CRI sees them, and a failed CRI pull (UNKNOWN
from containerd) answered with a documented status instead of UNKNOWN.

The containerd side is an in-process fake on a unix socket (CRI ImageService and Content), so the
real Prefetcher and PinnerApi run over real gRPC.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from services.common.containerd.client import ContainerdClient
from services.common.containerd.errors import ContainerdError, ContainerdNotFoundError
from services.common.genproto.containerd.services.content.v1 import content_pb2
from services.common.genproto.cri.runtime.v1 import api_pb2
from services.common.genproto.peermirror.pinner.v1 import pinner_pb2, pinner_pb2_grpc
from services.common.grpc_server import GrpcServer
from services.pinner.airgap.ingest import IngestChannel
from services.pinner.api import PinnerApi
from services.pinner.cri import CRI_NAMESPACE
from services.pinner.pins import PinManager
from services.pinner.prefetch import (
    InvalidPrefetchError,
    Prefetcher,
    normalise_reference,
    pull_failure_status,
)

# What containerd 1.6's CRI answered in the fuzz run when the registry was unreachable.
REFUSED = (
    'failed to pull and unpack image "docker.io/library/app:1": failed to resolve reference '
    '"docker.io/library/app:1": failed to do request: Head "http://127.0.0.1:9/v2/library/app/'
    'manifests/1?ns=docker.io": dial tcp 127.0.0.1:9: connect: connection refused'
)
MISSING = (
    'failed to pull and unpack image "docker.io/library/app:1": failed to resolve reference '
    '"docker.io/library/app:1": docker.io/library/app:1: not found'
)


class FakeCri:
    """Fails every pull with UNKNOWN and `detail`, as CRI does; reports no active ingests."""

    def __init__(self, detail: str) -> None:
        self.detail = detail
        self.pulled: list[str] = []

    async def pull_image(
        self, request: api_pb2.PullImageRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> api_pb2.PullImageResponse:
        self.pulled.append(request.image.image)
        await context.abort(grpc.StatusCode.UNKNOWN, self.detail)

    async def list_statuses(
        self,
        request: content_pb2.ListStatusesRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> content_pb2.ListStatusesResponse:
        return content_pb2.ListStatusesResponse()

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        """The two methods the Prefetcher calls, under containerd's service names."""
        pull = grpc.unary_unary_rpc_method_handler(
            self.pull_image,
            request_deserializer=api_pb2.PullImageRequest.FromString,
            response_serializer=api_pb2.PullImageResponse.SerializeToString,
        )
        statuses = grpc.unary_unary_rpc_method_handler(
            self.list_statuses,
            request_deserializer=content_pb2.ListStatusesRequest.FromString,
            response_serializer=content_pb2.ListStatusesResponse.SerializeToString,
        )
        return [
            grpc.method_handlers_generic_handler("runtime.v1.ImageService", {"PullImage": pull}),
            grpc.method_handlers_generic_handler(
                "containerd.services.content.v1.Content", {"ListStatuses": statuses}
            ),
        ]


@dataclass
class Served:
    stub: pinner_pb2_grpc.PinnerAsyncStub
    cri: FakeCri


@pytest.fixture
async def served(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Served]:
    cri = FakeCri(getattr(request, "param", REFUSED))
    socket = f"unix:{tmp_path / 'ctd.sock'}"
    containerd = GrpcServer(socket, name="fake-containerd")
    containerd.add_service(
        "runtime.v1.ImageService", lambda s: s.add_generic_rpc_handlers(cri.handlers())
    )
    await containerd.start()
    client = ContainerdClient(socket, "fuzz")
    ingest = IngestChannel(client.address, client.namespace)
    prefetcher = Prefetcher(ingest.channel, CRI_NAMESPACE)
    pinner = GrpcServer("127.0.0.1:0", name="pinner-test")
    PinnerApi(PinManager(client), prefetcher=prefetcher).register(pinner)
    await pinner.start()
    try:
        async with grpc.aio.insecure_channel(pinner.bound_address) as channel:
            yield Served(pinner_pb2_grpc.PinnerStub(channel), cri)
    finally:
        await pinner.stop(grace=None)
        await ingest.close()
        await client.close()
        await containerd.stop(grace=None)


async def _prefetch_error(
    stub: pinner_pb2_grpc.PinnerAsyncStub, reference: str
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.Prefetch(pinner_pb2.PrefetchRequest(reference=reference), timeout=10):
            pass
    return info.value


async def test_invalid_pin_and_unpin_refs_name_the_field(served: Served) -> None:
    for ref in ["", "   ", "Bad Ref!"]:
        for call in (
            served.stub.Pin(pinner_pb2.PinRequest(ref=ref), timeout=10),
            served.stub.Unpin(pinner_pb2.UnpinRequest(ref=ref), timeout=10),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (info.value.details() or "").startswith("ref: ")


def test_image_ids_are_not_pull_references() -> None:
    # Handed on unchecked, CRI would read `sha256:1/x` as host `sha256`, port 1.
    for image_id in ["sha256:1/x", "sha256:" + "f" * 64, " sha256:é"]:
        with pytest.raises(InvalidPrefetchError, match=r"^reference: an image id"):
            normalise_reference(image_id)


async def test_prefetch_of_an_image_id_never_reaches_cri(served: Served) -> None:
    error = await _prefetch_error(served.stub, "sha256:1/x")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith("reference: ")
    assert served.cri.pulled == []


async def test_unreachable_registry_is_unavailable_not_unknown(served: Served) -> None:
    error = await _prefetch_error(served.stub, "app:1")
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert (error.details() or "").startswith("reference 'app:1': ")
    assert "connection refused" in (error.details() or "")
    assert served.cri.pulled == ["docker.io/library/app:1"]


@pytest.mark.parametrize("served", [MISSING], indirect=True)
async def test_image_missing_upstream_is_not_found(served: Served) -> None:
    error = await _prefetch_error(served.stub, "app:1")
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_pull_failure_status_keeps_documented_codes_only() -> None:
    assert pull_failure_status(ContainerdNotFoundError("app:1")) == grpc.StatusCode.NOT_FOUND
    unavailable = ContainerdError("containerd down", grpc.StatusCode.UNAVAILABLE)
    assert pull_failure_status(unavailable) == grpc.StatusCode.UNAVAILABLE
    invalid = ContainerdError("bad reference", grpc.StatusCode.INVALID_ARGUMENT)
    assert pull_failure_status(invalid) == grpc.StatusCode.INVALID_ARGUMENT
    for code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, None):
        assert pull_failure_status(ContainerdError(REFUSED, code)) == grpc.StatusCode.UNAVAILABLE
    assert pull_failure_status(ContainerdError(MISSING, grpc.StatusCode.UNKNOWN)) == (
        grpc.StatusCode.NOT_FOUND
    )
