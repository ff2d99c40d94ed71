"""Prefetch: pulls an image through the node's containerd CRI ahead of a rollout, with progress.

CRI's PullImage reports nothing until it returns, so bytes are estimated meanwhile from
containerd's active content ingests (Content.ListStatuses), polled while the pull runs; once the
image is present its id and size come from CRI's ImageStatus. The tally is pure logic
(`IngestTally`), the polling and the calls stay in `Prefetcher`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from enum import Enum

import grpc

from services.common.containerd.client import NAMESPACE_METADATA_KEY
from services.common.containerd.errors import ContainerdError, translate_rpc_error
from services.common.errors import InvalidArgumentError
from services.common.genproto.containerd.services.content.v1 import (
    content_pb2,
    content_pb2_grpc,
)
from services.pinner.cri import PULL_TIMEOUT, STATUS_TIMEOUT, CriPuller
from services.pinner.pins import candidate_names

# Often enough for a progress bar to move, rare enough to cost containerd nothing.
POLL_INTERVAL = 0.5


class Phase(Enum):
    """Stages of a prefetch (PrefetchPhase in the API)."""

    STARTED = "started"
    PULLING = "pulling"
    DONE = "done"


@dataclass(frozen=True, slots=True)
class PrefetchUpdate:
    """One progress report of a prefetch."""

    reference: str
    phase: Phase
    bytes_done: int = 0
    bytes_total: int = 0
    elapsed: float = 0.0
    image_id: str = ""
    image_size: int = 0


@dataclass(frozen=True, slots=True)
class Ingest:
    """One of containerd's in-progress content writes: its ref, bytes written, expected size."""

    ref: str
    offset: int
    total: int


class IngestTally:
    """Bytes a pull fetched, from successive snapshots of containerd's active ingests.

    An ingest that disappears between snapshots was committed (or abandoned): its expected size
    (or, unknown, its last offset) counts as fetched. Ingests already active when the tally
    began belong to something else and are ignored; ones that start and finish between two
    snapshots are not seen, so the counts are a lower bound until the image's size is known.
    """

    def __init__(self, before: Iterable[Ingest] = ()) -> None:
        self._ignored = {i.ref for i in before}
        self._active: dict[str, Ingest] = {}
        self._finished = 0

    def observe(self, snapshot: Iterable[Ingest]) -> None:
        current = {i.ref: i for i in snapshot if i.ref not in self._ignored}
        for ref, gone in self._active.items():
            if ref not in current:
                self._finished += gone.total or gone.offset
        self._active = current

    @property
    def bytes_done(self) -> int:
        return self._finished + sum(i.offset for i in self._active.values())

    @property
    def bytes_total(self) -> int:
        return self._finished + sum(max(i.total, i.offset) for i in self._active.values())


class InvalidPrefetchError(InvalidArgumentError):
    """The request names no valid image reference (the message names the field)."""


def normalise_reference(reference: str) -> str:
    """The reference CRI will pull: validated, Docker-style short names expanded."""
    if not reference.strip():
        raise InvalidPrefetchError("reference: must not be empty")
    if reference.strip().startswith("sha256:"):
        # An image id (what Pin accepts as a record name) names nothing to pull, and handed on
        # unchecked CRI would read it as a reference: `sha256:1/x` is host `sha256`, port 1.
        raise InvalidPrefetchError(
            "reference: an image id (sha256:...) cannot be pulled; name the image by tag or digest"
        )
    try:
        return candidate_names(reference)[-1]
    except ValueError as exc:
        raise InvalidPrefetchError(f"reference: {exc}") from exc


# Statuses a failed pull keeps: the client's mistake, a missing image, a retryable outage.
_PULL_STATUSES = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE,
)


def pull_failure_status(exc: ContainerdError) -> grpc.StatusCode:
    """The API status of a prefetch that failed with `exc`: NOT_FOUND or UNAVAILABLE, as the
    API documents (INVALID_ARGUMENT when containerd refused the reference), never UNKNOWN.

    CRI answers every failed pull with UNKNOWN and the chain of causes as text (an unreachable
    registry, a refused login, a missing tag alike); containerd's not-found error reads "not
    found", so a tag or manifest missing upstream is told apart by the message's end.
    """
    if exc.code in _PULL_STATUSES:
        return exc.code
    if str(exc).rstrip().endswith("not found"):
        return grpc.StatusCode.NOT_FOUND
    return grpc.StatusCode.UNAVAILABLE


class Prefetcher:
    """Pulls images through containerd's CRI on `channel` and reports progress; `namespace` is
    the one containerd's CRI plugin writes into (where the ingests show)."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        namespace: str,
        *,
        poll_interval: float = POLL_INTERVAL,
        pull_timeout: float = PULL_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cri = CriPuller(channel, pull_timeout)
        self._content = content_pb2_grpc.ContentStub(channel)
        self._poll_interval = poll_interval
        self._clock = clock
        self._metadata = ((NAMESPACE_METADATA_KEY, namespace),)

    async def ingests(self) -> list[Ingest]:
        """containerd's active ingests in the CRI namespace."""
        try:
            reply = await self._content.ListStatuses(
                content_pb2.ListStatusesRequest(), metadata=self._metadata, timeout=STATUS_TIMEOUT
            )
        except grpc.aio.AioRpcError as err:
            raise translate_rpc_error(err, "content ingests") from err
        return [Ingest(s.ref, s.offset, s.total) for s in reply.statuses]

    async def prefetch(self, reference: str) -> AsyncIterator[PrefetchUpdate]:
        """Pull `reference`; yields STARTED, PULLING updates while it runs, then DONE.

        Raises InvalidPrefetchError for a bad reference and ContainerdError when the pull fails.
        """
        ref = normalise_reference(reference)
        start = self._clock()

        def update(phase: Phase, tally: IngestTally) -> PrefetchUpdate:
            return PrefetchUpdate(
                reference=reference,
                phase=phase,
                bytes_done=tally.bytes_done,
                bytes_total=tally.bytes_total,
                elapsed=self._clock() - start,
            )

        tally = IngestTally(await self.ingests())
        yield update(Phase.STARTED, tally)
        pull = asyncio.create_task(self._cri.pull(ref))
        try:
            while True:
                done, _ = await asyncio.wait({pull}, timeout=self._poll_interval)
                if done:
                    break
                # Progress is best effort: a failed poll must not fail the pull.
                with contextlib.suppress(ContainerdError):
                    tally.observe(await self.ingests())
                yield update(Phase.PULLING, tally)
            image_id = pull.result()
        finally:
            if not pull.done():
                pull.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pull
        size = await self._cri.image_size(ref)
        yield PrefetchUpdate(
            reference=reference,
            phase=Phase.DONE,
            bytes_done=size,
            bytes_total=size,
            elapsed=self._clock() - start,
            image_id=image_id,
            image_size=size,
        )
