"""Writes archive content into containerd under a lease, on a connection of its own.

Imports move gigabytes; a dedicated channel keeps those transfers from queueing behind (or in
front of) the pinner's other containerd calls. Every call carries the namespace and the lease id
(`containerd-lease` metadata), so content written here cannot be garbage-collected before the
image records referring to it exist; deleting the lease releases whatever nothing refers to.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc

from services.common.containerd.client import NAMESPACE_METADATA_KEY, grpc_target
from services.common.containerd.errors import (
    ContainerdAlreadyExistsError,
    ContainerdError,
    translate_rpc_error,
    translate_status,
)
from services.common.genproto.containerd.services.content.v1 import (
    content_pb2,
    content_pb2_grpc,
)
from services.common.genproto.containerd.services.leases.v1 import leases_pb2, leases_pb2_grpc

LEASE_METADATA_KEY = "containerd-lease"
# containerd drops a lease past this label's time, so a crashed import cannot pin junk forever.
LEASE_EXPIRE_LABEL = "containerd.io/gc.expire"
LEASE_TTL = timedelta(hours=2)
CONTENT_RESOURCE = "content"

_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", 16 << 20),
    ("grpc.max_send_message_length", 16 << 20),
]

_WriteCall = grpc.aio.StreamStreamCall[
    content_pb2.WriteContentRequest, content_pb2.WriteContentResponse
]


class IngestChannel:
    """A channel to containerd for bulk imports; open leases with `lease()`."""

    def __init__(self, address: str, namespace: str) -> None:
        self.address = address
        self.namespace = namespace
        self._channel = grpc.aio.insecure_channel(grpc_target(address), options=_CHANNEL_OPTIONS)
        self._content = content_pb2_grpc.ContentStub(self._channel)
        self._leases = leases_pb2_grpc.LeasesStub(self._channel)

    @property
    def channel(self) -> grpc.aio.Channel:
        """The underlying channel (containerd also serves CRI on it)."""
        return self._channel

    async def close(self) -> None:
        await self._channel.close()

    def lease(self, purpose: str) -> Lease:
        """A lease (created on `async with`, deleted on exit) for one import."""
        return Lease(self, purpose)


class Lease:
    """One containerd lease and the writes made under it."""

    def __init__(self, channel: IngestChannel, purpose: str) -> None:
        self._ch = channel
        self.id = f"peermirror-import-{uuid.uuid4().hex[:16]}"
        self._purpose = purpose
        self._metadata = (
            (NAMESPACE_METADATA_KEY, channel.namespace),
            (LEASE_METADATA_KEY, self.id),
        )
        self._plain = ((NAMESPACE_METADATA_KEY, channel.namespace),)
        self._serial = 0

    async def __aenter__(self) -> Lease:
        expire = (datetime.now(UTC) + LEASE_TTL).strftime("%Y-%m-%dT%H:%M:%SZ")
        request = leases_pb2.CreateRequest(
            id=self.id,
            labels={LEASE_EXPIRE_LABEL: expire, "io.peermirror.import": self._purpose[-200:]},
        )
        try:
            await self._ch._leases.Create(request, metadata=self._plain)
        except grpc.aio.AioRpcError as err:
            raise translate_rpc_error(err, f"lease {self.id}") from err
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        # After a failure, collect at once so the half-written content is gone when we report.
        await self.release(sync=exc is not None)

    async def release(self, *, sync: bool = False) -> None:
        """Delete the lease (what nothing else references becomes garbage). Idempotent."""
        try:
            await self._ch._leases.Delete(
                leases_pb2.DeleteRequest(id=self.id, sync=sync), metadata=self._plain
            )
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise translate_rpc_error(err, f"lease {self.id}") from err

    async def hold(self, digest: str) -> None:
        """Add content that was already present to the lease, so it survives until we are done."""
        request = leases_pb2.AddResourceRequest(
            id=self.id, resource=leases_pb2.Resource(id=digest, type=CONTENT_RESOURCE)
        )
        try:
            await self._ch._leases.AddResource(request, metadata=self._plain)
        except grpc.aio.AioRpcError as err:
            raise translate_rpc_error(err, digest) from err

    async def writer(self, size: int, expected: str | None) -> BlobWriter | None:
        """Start writing a blob of `size` bytes; None when `expected` is already present."""
        self._serial += 1
        ref = f"{self.id}-{self._serial}"
        writer = BlobWriter(self._ch._content.Write(metadata=self._metadata), ref, size)
        if not await writer.open(expected):
            return None
        return writer


class BlobWriter:
    """One Content.Write stream; chunks are sent without waiting for each acknowledgement.

    containerd answers every request; a background task reads those answers, so a failure
    (a locked ref, a full disk) stops the next `write` while the happy path never waits on a
    round trip per chunk.
    """

    def __init__(self, call: _WriteCall, ref: str, size: int) -> None:
        self._call = call
        self.ref = ref
        self.size = size
        self.offset = 0
        self._answers: asyncio.Task[None] | None = None

    async def open(self, expected: str | None) -> bool:
        """Send STAT; False when `expected` content already exists (the stream is then closed)."""
        action = content_pb2.WriteAction
        try:
            await self._call.write(
                content_pb2.WriteContentRequest(
                    action=action.STAT, ref=self.ref, total=self.size, expected=expected or ""
                )
            )
            resp = await self._call.read()
        except grpc.aio.AioRpcError as err:
            self._call.cancel()
            translated = translate_rpc_error(err, self.ref)
            if isinstance(translated, ContainerdAlreadyExistsError):
                return False
            raise translated from err
        if resp is grpc.aio.EOF:
            error = await self._status_error()
            self._call.cancel()
            if isinstance(error, ContainerdAlreadyExistsError):
                return False
            raise error
        assert isinstance(resp, content_pb2.WriteContentResponse)
        if resp.offset:
            # A ref is unique to this lease, so leftover data means a logic error upstream.
            self._call.cancel()
            raise ContainerdError(f"ingest {self.ref} unexpectedly holds {resp.offset} bytes")
        self._answers = asyncio.create_task(self._read_answers())
        return True

    async def _read_answers(self) -> None:
        # Ends at the stream's end; the call's status then tells success from failure.
        try:
            while await self._call.read() is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError:
            return

    async def _status_error(self) -> ContainerdError:
        code = await self._call.code()
        details = await self._call.details()
        return translate_status(code, details or "write stream ended early", self.ref)

    async def write(self, chunk: bytes) -> None:
        if self._answers is not None and self._answers.done():
            raise await self._failure()
        request = content_pb2.WriteContentRequest(
            action=content_pb2.WriteAction.WRITE, ref=self.ref, offset=self.offset, data=chunk
        )
        try:
            await self._call.write(request)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as err:
            raise await self._failure() from err
        self.offset += len(chunk)

    async def commit(self, digest: str, labels: dict[str, str] | None = None) -> bool:
        """Commit as `digest`; containerd verifies size and digest. False if it already existed."""
        request = content_pb2.WriteContentRequest(
            action=content_pb2.WriteAction.COMMIT,
            ref=self.ref,
            offset=self.offset,
            total=self.size,
            expected=digest,
            labels=labels or {},
        )
        try:
            await self._call.write(request)
            await self._call.done_writing()
            if self._answers is not None:
                await self._answers
            code = await self._call.code()
        except grpc.aio.AioRpcError as err:
            translated = translate_rpc_error(err, f"{digest} (ref {self.ref})")
            if isinstance(translated, ContainerdAlreadyExistsError):
                return False
            raise translated from err
        if code != grpc.StatusCode.OK:
            error = await self._status_error()
            if isinstance(error, ContainerdAlreadyExistsError):
                return False
            raise error
        return True

    async def _failure(self) -> ContainerdError:
        if self._answers is not None and not self._answers.done():
            self._answers.cancel()
        try:
            return await self._status_error()
        except grpc.aio.AioRpcError as err:
            return translate_rpc_error(err, self.ref)

    async def abort(self) -> None:
        """Stop the stream; containerd drops the partial ingest with the lease."""
        if self._answers is not None:
            self._answers.cancel()
        self._call.cancel()
