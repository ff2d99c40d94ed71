"""Content stores: one Protocol, three backends (containerd, OCI image layout, in-memory fake)."""

from services.common.store.protocol import (
    ContentStore,
    Descriptor,
    EventKind,
    ImageRecord,
    NotFoundError,
    StoreEvent,
    StoreWatch,
)

__all__ = [
    "ContentStore",
    "Descriptor",
    "EventKind",
    "ImageRecord",
    "NotFoundError",
    "StoreEvent",
    "StoreWatch",
]
