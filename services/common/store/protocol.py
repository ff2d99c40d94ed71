"""The content-store contract every backend (containerd, OCI layout, in-memory fake) honours.

The registry serves from it and the pinner walks it; both only ever see this interface, so a
backend can be swapped without touching either.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from services.common.errors import NotFoundError, UnavailableError


class ContentNotFoundError(NotFoundError):
    """The store holds no content (or no image) under the given digest or reference."""

    def __init__(self, what: str) -> None:
        super().__init__(f"not found: {what}")
        self.what = what


class StoreUnavailableError(UnavailableError):
    """The store failed for another reason than "not found": it cannot be reached (containerd
    down or restarting) or its files cannot be read. Every backend raises this, and only this,
    for such failures, so callers need not know the backend to tell a miss from an outage."""


@contextlib.contextmanager
def store_failures(*kinds: type[BaseException]) -> Iterator[None]:
    """Raise a backend's own failures of `kinds` as StoreUnavailableError (misses pass)."""
    try:
        yield
    except (ContentNotFoundError, StoreUnavailableError):
        raise
    except kinds as exc:
        raise StoreUnavailableError(f"{type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Descriptor:
    """What a tag points at: the content address, its size and (when known) its media type."""

    digest: str
    size: int
    media_type: str = ""


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """One named image of the store: `name` is a full reference, `<registry>/<repo>:<tag>`."""

    name: str
    target: Descriptor
    labels: Mapping[str, str] = field(default_factory=dict)


class EventKind(enum.Enum):
    """The changes a store reports through `watch()`."""

    IMAGE_CREATE = "image_create"
    IMAGE_UPDATE = "image_update"
    IMAGE_DELETE = "image_delete"
    CONTENT_DELETE = "content_delete"
    # Content may have gone without a CONTENT_DELETE per digest (containerd's garbage collector
    # publishes nothing): whoever relies on content re-checks it. `subject` is empty.
    CONTENT_COLLECTED = "content_collected"


@dataclass(frozen=True, slots=True)
class StoreEvent:
    """One change: `subject` is an image name for image events and a digest for content events."""

    kind: EventKind
    subject: str


class StoreWatch(Protocol):
    """The changes of one store from the moment the watch is in force, until closed."""

    def __aiter__(self) -> StoreWatch: ...

    async def __anext__(self) -> StoreEvent:
        """The next change; StopAsyncIteration once closed, the store's error when it is lost."""
        ...

    async def ready(self) -> bool:
        """Return once every change made from now on will be yielded.

        True when the store proved it (containerd: a probe event came back through the
        subscription), False when it could only assume so. Events received before are dropped:
        callers list the store after this returns.
        """
        ...

    async def aclose(self) -> None:
        """Stop watching; a pending `__anext__` ends the iteration."""
        ...


@runtime_checkable
class ContentStore(Protocol):
    """Read access to one node's images and blobs."""

    async def resolve(self, reference: str) -> Descriptor:
        """Return the target of image `reference` (`<registry>/<repo>:<tag>`).

        Raises ContentNotFoundError if absent, StoreUnavailableError if the store failed.
        """
        ...

    async def stat(self, digest: str) -> int:
        """Return the size in bytes of content `digest`; ContentNotFoundError if absent,
        StoreUnavailableError if the store failed."""
        ...

    def read(self, digest: str, offset: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        """Stream `length` bytes (all to the end when None) of `digest` from `offset`.

        Raises ContentNotFoundError (on first iteration) when the content is absent,
        StoreUnavailableError when the store failed.
        """
        ...

    def local_path(self, digest: str) -> Path | None:
        """Return a readable file holding exactly the bytes of `digest`, or None (no fast path)."""
        ...

    async def list_images(self) -> list[ImageRecord]:
        """Return every named image of the store."""
        ...

    async def digests(self) -> set[str]:
        """Return the digest of every blob the store holds (one listing, not a stat each)."""
        ...

    def watch(self) -> StoreWatch:
        """Watch image and content changes (in a running event loop); see `StoreWatch.ready`."""
        ...

    async def close(self) -> None:
        """Release connections and watchers."""
        ...
