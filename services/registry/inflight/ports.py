"""The small interfaces the in-flight machinery is coded against (lease, upstream, discovery).

The real implementations live elsewhere (the discovery lease client, the upstream client, the
local discovery API); in-memory fakes stand in for them in unit tests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from services.common.discovery_router import Holder, LeaseAnswer

__all__ = ["FetchLimiter", "FetchSlot", "Holder", "KeyAdvertiser", "LeaseAnswer", "LeaseClient"]


class LeaseClient(Protocol):
    """Fetch leases per key (a digest or a tag reference), granted by the DHT's closest nodes."""

    async def acquire(self, key: str, max_waiters: int = 0) -> LeaseAnswer:
        """Ask for the lease on `key`, or for a holder serving at most `max_waiters` other
        nodes (0: no bound); raises on transport failure."""
        ...

    async def renew(self, key: str) -> bool:
        """Extend our lease on `key`; False when it is no longer ours."""
        ...

    async def release(self, key: str) -> None:
        """Give our lease on `key` back so a later miss can take it at once."""
        ...


class UpstreamBody(Protocol):
    """A streaming upstream answer for a blob, from some offset on."""

    @property
    def size(self) -> int:
        """The whole blob's size in bytes (not only the part this body carries)."""
        ...

    def chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes, from the offset asked for to the end."""
        ...

    async def aclose(self) -> None:
        """Drop the connection (idempotent)."""
        ...


@dataclass(frozen=True, slots=True)
class UpstreamManifest:
    """A manifest as the upstream served it."""

    digest: str
    body: bytes
    media_type: str


class UpstreamFetcher(Protocol):
    """Fetches from the upstream registry the way containerd would (endpoints, TLS, auth)."""

    async def fetch_blob(
        self, registry: str, repository: str, digest: str, offset: int
    ) -> UpstreamBody:
        """Blob `digest` from `offset` on; raises on any failure (auth, network, 404)."""
        ...

    async def fetch_manifest(
        self, registry: str, repository: str, reference: str
    ) -> UpstreamManifest:
        """Manifest `reference` (a tag or a digest); raises on any failure."""
        ...


class KeyAdvertiser(Protocol):
    """The local discovery API's Advertise and Withdraw."""

    async def advertise(self, keys: Sequence[str]) -> None:
        """Start providing `keys` (raises on transport failure)."""
        ...

    async def withdraw(self, keys: Sequence[str]) -> None:
        """Stop providing `keys` (raises on transport failure)."""
        ...


class FetchSlot(Protocol):
    """One granted back-to-source slot; given back once the fetch ends."""

    def release(self) -> None:
        """Give the slot back (idempotent)."""
        ...


class FetchLimiter(Protocol):
    """The node's back-to-source limits (concurrent upstream fetches and bandwidth)."""

    async def acquire(self) -> FetchSlot | None:
        """A slot for one upstream fetch, or None when the node is at its cap (after at most
        a brief wait): the miss is then answered 404 at once."""
        ...


class _Unlimited:
    def release(self) -> None:
        return None


class NoLimit:
    """A limiter that never refuses (until the node's real limiter is wired in)."""

    async def acquire(self) -> FetchSlot | None:
        return _Unlimited()
