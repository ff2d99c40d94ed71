"""Content stores: one Protocol, three backends (containerd, OCI image layout, in-memory fake)."""

from services.common.store.protocol import (
    ContentNotFoundError,
    ContentStore,
    Descriptor,
    EventKind,
    ImageRecord,
    StoreEvent,
    StoreUnavailableError,
    StoreWatch,
)

__all__ = [
    "ContentNotFoundError",
    "ContentStore",
    "Descriptor",
    "EventKind",
    "ImageRecord",
    "StoreEvent",
    "StoreUnavailableError",
    "StoreWatch",
]
