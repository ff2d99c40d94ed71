"""In-memory stand-ins for what the in-flight coordinator talks to: a cluster's lease table, an
upstream registry with fault injection (slow, gated, broken, corrupt bodies), discovery's
Advertise/Withdraw and a back-to-source limiter. For unit tests and fault injection only."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from services.registry.inflight.ports import (
    FetchSlot,
    Holder,
    LeaseAnswer,
    UpstreamManifest,
)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class LeaseTable:
    """The leases of a whole cluster: one holder per key until it releases or its ttl passes
    without a renewal."""

    def __init__(self, ttl: float = 5.0) -> None:
        self.ttl = ttl
        self.held: dict[str, tuple[Holder, float]] = {}
        self.granted: list[tuple[str, Holder]] = []
        self.renewals: list[str] = []
        self.released: list[str] = []
        self.down = False
        # Nodes whose process is gone: nothing they send reaches discovery any more.
        self.crashed: set[Holder] = set()

    def client(self, me: Holder) -> FakeLease:
        return FakeLease(self, me)

    def crash(self, node: Holder) -> None:
        """`node` died: its leases stay until their ttl runs out, unrenewed and unreleased."""
        self.crashed.add(node)

    def expire(self, key: str) -> None:
        """The holder of `key` died or stalled: its lease runs out now."""
        self.held.pop(key, None)


@dataclass
class FakeLease:
    """One node's lease client over a shared LeaseTable."""

    table: LeaseTable
    me: Holder

    async def acquire(self, key: str) -> LeaseAnswer:
        if self.table.down:
            raise ConnectionError("discovery unavailable")
        now = time.monotonic()
        held = self.table.held.get(key)
        if held is not None and held[1] > now and held[0] != self.me:
            return LeaseAnswer(granted=False, holder=held[0])
        self.table.held[key] = (self.me, now + self.table.ttl)
        self.table.granted.append((key, self.me))
        return LeaseAnswer(granted=True, ttl=self.table.ttl)

    async def renew(self, key: str) -> bool:
        if self.me in self.table.crashed:
            raise ConnectionError("this node's process is gone")
        self.table.renewals.append(key)
        held = self.table.held.get(key)
        if held is None or held[0] != self.me:
            return False
        self.table.held[key] = (self.me, time.monotonic() + self.table.ttl)
        return True

    async def release(self, key: str) -> None:
        if self.me in self.table.crashed:
            raise ConnectionError("this node's process is gone")
        held = self.table.held.get(key)
        if held is not None and held[0] == self.me:
            del self.table.held[key]
            self.table.released.append(key)


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
            await asyncio.sleep(self.manifest_delay)
        if self.refuse is not None:
            raise self.refuse
        return self.manifests[reference]


@dataclass
class FakeAdvertiser:
    """Discovery's Advertise/Withdraw, recorded."""

    advertised: list[str] = field(default_factory=list)
    withdrawn: list[str] = field(default_factory=list)

    async def advertise(self, keys: Sequence[str]) -> None:
        self.advertised.extend(keys)

    async def withdraw(self, keys: Sequence[str]) -> None:
        self.withdrawn.extend(keys)


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
