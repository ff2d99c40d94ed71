"""In-memory stand-ins for what the in-flight coordinator talks to: a cluster's lease table, an
upstream registry with fault injection (slow, gated, broken, corrupt bodies), discovery's
Advertise/Withdraw and a back-to-source limiter. For unit tests and fault injection only."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from services.registry.inflight.ports import (
    FetchSlot,
    UpstreamManifest,
)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class FakeBody:
    """A blob body from `offset`, sent in `chunk` pieces; each piece waits for `gate` (when set)
    and `delay`; `break_at` cuts it (once) at that absolute offset."""

    data: bytes
    offset: int
    chunk: int
    gate: asyncio.Event | None
    delay: float
    break_at: int | None
    closed: bool = False

    @property
    def size(self) -> int:
        return len(self.data)

    async def chunks(self) -> AsyncIterator[bytes]:
        position = self.offset
        while position < len(self.data):
            if self.gate is not None:
                await self.gate.wait()
            if self.delay:
                # A slow upstream on purpose: pacing is what this fake is for.
                await asyncio.sleep(self.delay)
            end = min(position + self.chunk, len(self.data))
            if self.break_at is not None and position < self.break_at <= end:
                yield self.data[position : self.break_at]
                raise ConnectionResetError("upstream connection reset")
            yield self.data[position:end]
            position = end

    async def aclose(self) -> None:
        self.closed = True


@dataclass
class FakeUpstream:
    """Blobs and manifests an upstream registry serves; every request is recorded."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[str, UpstreamManifest] = field(default_factory=dict)
    chunk: int = 64 * 1024
    gate: asyncio.Event | None = None
    delay: float = 0.0
    # Absolute offset at which the next body breaks (reset after one use).
    break_at: int | None = None
    # Served instead of the real bytes (same length): a corrupt upstream.
    corrupt: bool = False
    refuse: BaseException | None = None
    manifest_delay: float = 0.0
    blob_calls: list[tuple[str, int]] = field(default_factory=list)
    manifest_calls: list[str] = field(default_factory=list)

    def add_blob(self, data: bytes) -> str:
        digest = sha256(data)
        self.blobs[digest] = data
        return digest

    async def fetch_blob(
        self, registry: str, repository: str, digest: str, offset: int
    ) -> FakeBody:
        self.blob_calls.append((digest, offset))
        if self.refuse is not None:
            raise self.refuse
        data = self.blobs[digest]
        if self.corrupt:
            data = bytes(b ^ 0xFF for b in data[:1]) + data[1:]
        break_at, self.break_at = self.break_at, None
        return FakeBody(data, offset, self.chunk, self.gate, self.delay, break_at)

    async def fetch_manifest(
        self, registry: str, repository: str, reference: str
    ) -> UpstreamManifest:
        self.manifest_calls.append(reference)
        if self.manifest_delay:
            # A slow manifest answer on purpose (keeps concurrent askers in the window).
            await asyncio.sleep(self.manifest_delay)
        if self.refuse is not None:
            raise self.refuse
        return self.manifests[reference]


class _Slot:
    def __init__(self, limiter: CountingLimiter) -> None:
        self._limiter: CountingLimiter | None = limiter

    def release(self) -> None:
        if self._limiter is not None:
            self._limiter.in_use -= 1
            self._limiter = None


@dataclass
class CountingLimiter:
    """At most `cap` concurrent upstream fetches; past it, refuse at once."""

    cap: int
    in_use: int = 0

    async def acquire(self) -> FetchSlot | None:
        if self.in_use >= self.cap:
            return None
        self.in_use += 1
        return _Slot(self)
