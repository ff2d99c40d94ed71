"""The pinner's node-local gRPC API (peermirror.pinner.v1.Pinner): pins, status, resync, prefetch.

Pins and prefetches go to containerd, import states come from the AirgapManager; what only the
service knows (participation, advertisement counts, the store connection, a full resync) is
asked of it through the two optional callbacks, so this module stays independent of how the
service tracks state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import KW_ONLY, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from services.common.containerd.errors import (
    ContainerdError,
    ContainerdNotFoundError,
    ContainerdUnavailableError,
)
from services.common.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PeermirrorError,
    UnavailableError,
    UnimplementedError,
    error_for_status,
)
from services.common.genproto.peermirror.pinner.v1 import pinner_pb2, pinner_pb2_grpc
from services.pinner.pins import InvalidReferenceError, Pin, PinManager
from services.pinner.prefetch import (
    Phase,
    PrefetchUpdate,
    pull_failure_status,
)

if TYPE_CHECKING:
    from services.common.grpc_server import GrpcServer
    from services.pinner.airgap.manager import AirgapManager, ImportStatus
    from services.pinner.prefetch import Prefetcher

_T = TypeVar("_T")

SERVICE_NAME: str = pinner_pb2.DESCRIPTOR.services_by_name["Pinner"].full_name


@dataclass(frozen=True, slots=True)
class SyncState:
    """What the service reports about advertising (the Status fields the API cannot know)."""

    participating: bool = False
    containerd_connected: bool = True
    last_sync: datetime | None = None
    last_sync_error: str = ""
    advertised_keys: int = 0


@dataclass(frozen=True, slots=True)
class SyncOutcome:
    """What a service resync changed."""

    advertised: int = 0
    withdrawn: int = 0


SyncStateFn = Callable[[], SyncState]
ResyncFn = Callable[[], Awaitable[SyncOutcome]]

_RESULTS = {
    "pending": pinner_pb2.IMPORT_RESULT_PENDING,
    "imported": pinner_pb2.IMPORT_RESULT_IMPORTED,
    "failed": pinner_pb2.IMPORT_RESULT_FAILED,
}


def _timestamp(when: datetime | None) -> Timestamp | None:
    if when is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(when)
    return ts


_PHASES = {
    Phase.STARTED: pinner_pb2.PREFETCH_PHASE_STARTED,
    Phase.PULLING: pinner_pb2.PREFETCH_PHASE_PULLING,
    Phase.DONE: pinner_pb2.PREFETCH_PHASE_DONE,
}

# What a prefetch on a pinner without containerd answers.
NO_CONTAINERD = (
    "prefetch needs containerd: this pinner runs with the oci-layout store "
    "(store.backend), which has no CRI to pull through"
)


def progress_message(update: PrefetchUpdate) -> pinner_pb2.PrefetchProgress:
    return pinner_pb2.PrefetchProgress(
        phase=_PHASES[update.phase],
        bytes_done=update.bytes_done,
        bytes_total=update.bytes_total,
        elapsed_seconds=update.elapsed,
        image_id=update.image_id,
        image_size=update.image_size,
        reference=update.reference,
    )


def pin_message(pin: Pin) -> pinner_pb2.PinnedImage:
    # Pin's fields are PinnedImage's, name for name.
    return pinner_pb2.PinnedImage(**dataclasses.asdict(pin))


def import_message(state: ImportStatus) -> pinner_pb2.ImportState:
    return pinner_pb2.ImportState(
        path=str(state.path),
        result=_RESULTS[state.result],
        error=state.error,
        images=list(state.images),
        size=state.size,
        finished_at=_timestamp(state.finished_at),
    )


@dataclass(eq=False)
class PinnerApi(pinner_pb2_grpc.PinnerServicer):
    """Servicer of the Pinner API.

    Without containerd (`pins` None: the oci-layout store) there is nothing to pin or pull
    through: Prefetch is refused with FAILED_PRECONDITION saying why, and pins, status and
    resync answer UNIMPLEMENTED, as when no Pinner service was served there (`peermirror
    status` relies on that).
    """

    pins: PinManager | None
    _: KW_ONLY
    prefetcher: Prefetcher | None = None
    airgap: AirgapManager | None = None
    sync_state: SyncStateFn | None = None
    resync: ResyncFn | None = None

    def register(self, server: GrpcServer) -> None:
        server.add_service(
            SERVICE_NAME, lambda s: pinner_pb2_grpc.add_PinnerServicer_to_server(self, s)
        )

    def _containerd(self) -> PinManager:
        if self.pins is None:
            raise UnimplementedError("the pinner has no containerd here")
        return self.pins

    async def _with_pins(self, call: Callable[[PinManager], Awaitable[_T]], ref: str = "") -> _T:
        """`call` on the pins; its failures raised as the errors (and so the statuses) they
        mean to a caller of this API."""
        pins = self._containerd()
        try:
            return await call(pins)
        except InvalidReferenceError as exc:
            raise InvalidArgumentError(str(exc), field="ref") from exc
        except ContainerdError as exc:
            raise _api_error(exc, ref) from exc

    async def ListPins(
        self, request: pinner_pb2.ListPinsRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pinner_pb2.ListPinsResponse:
        pinned = await self._with_pins(lambda pins: pins.pinned())
        return pinner_pb2.ListPinsResponse(pins=[pin_message(p) for p in pinned])

    async def Pin(
        self, request: pinner_pb2.PinRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pinner_pb2.PinResponse:
        pin = await self._with_pins(lambda pins: pins.pin(request.ref), request.ref)
        return pinner_pb2.PinResponse(pin=pin_message(pin))

    async def Unpin(
        self, request: pinner_pb2.UnpinRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pinner_pb2.UnpinResponse:
        was_pinned = await self._with_pins(lambda pins: pins.unpin(request.ref), request.ref)
        return pinner_pb2.UnpinResponse(was_pinned=was_pinned)

    async def Status(
        self, request: pinner_pb2.StatusRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pinner_pb2.StatusResponse:
        pins = self._containerd()
        state = self.sync_state() if self.sync_state is not None else SyncState()
        try:
            pinned = len(await pins.pinned())
            connected = state.containerd_connected
        except ContainerdError:
            pinned, connected = 0, False
        imports = self.airgap.status() if self.airgap is not None else []
        return pinner_pb2.StatusResponse(
            participating=state.participating,
            containerd_connected=connected,
            namespace=pins.client.namespace,
            last_sync=_timestamp(state.last_sync),
            last_sync_error=state.last_sync_error,
            advertised_keys=state.advertised_keys,
            pinned_images=pinned,
            imports=[import_message(s) for s in imports],
        )

    async def Resync(
        self, request: pinner_pb2.ResyncRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pinner_pb2.ResyncResponse:
        self._containerd()
        try:
            imported = await self.airgap.rescan() if self.airgap is not None else 0
            outcome = await self.resync() if self.resync is not None else SyncOutcome()
        except ContainerdError as exc:
            raise _api_error(exc) from exc
        return pinner_pb2.ResyncResponse(
            advertised=outcome.advertised,
            withdrawn=outcome.withdrawn,
            imported=imported,
            finished_at=_timestamp(datetime.now(UTC)),
        )

    async def Prefetch(
        self,
        request: pinner_pb2.PrefetchRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[pinner_pb2.PrefetchProgress]:
        if self.prefetcher is None:
            raise FailedPreconditionError(NO_CONTAINERD)
        # An InvalidPrefetchError (the field named) is answered by the ErrorStatuses interceptor.
        try:
            async for update in self.prefetcher.prefetch(request.reference):
                yield progress_message(update)
        except ContainerdError as exc:
            # Name the field, keep containerd's reason (not found upstream, unreachable, ...).
            message = f"reference {request.reference!r}: {exc}"
            raise error_for_status(pull_failure_status(exc), message) from exc


def _api_error(exc: ContainerdError, ref: str = "") -> PeermirrorError:
    """What a failed containerd call means to this API's caller: a missing image names the
    reference asked for; containerd out of reach is UNAVAILABLE; anything else INTERNAL."""
    if isinstance(exc, ContainerdNotFoundError):
        return NotFoundError(f"no such image: {ref}")
    if isinstance(exc, ContainerdUnavailableError):
        return UnavailableError(str(exc))
    return PeermirrorError(str(exc))
