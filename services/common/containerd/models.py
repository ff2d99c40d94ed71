"""Plain records the containerd client returns, so callers never handle protobuf messages."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from services.common.store.protocol import Descriptor

# Topics containerd 1.6+ publishes for the changes we follow (`/content/create` needs 2.1).
TOPIC_IMAGE_CREATE = "/images/create"
TOPIC_IMAGE_UPDATE = "/images/update"
TOPIC_IMAGE_DELETE = "/images/delete"
TOPIC_CONTENT_CREATE = "/content/create"
TOPIC_CONTENT_DELETE = "/content/delete"

CONTENT_PLUGIN_TYPE = "io.containerd.content.v1"
CONTENT_PLUGIN_ID = "content"


@dataclass(frozen=True, slots=True, kw_only=True)
class Record:
    """What containerd keeps on every record it stores: labels and its two timestamps."""

    labels: Mapping[str, str] = field(default_factory=dict)
    created_at: datetime | None = None
    updated_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class ContentInfo(Record):
    """One committed blob as containerd's namespace sees it."""

    digest: str
    size: int


@dataclass(frozen=True, slots=True)
class Image(Record):
    """One image record: a name (`<registry>/<repo>:<tag>` or `name@digest`) and its target."""

    name: str
    target: Descriptor


@dataclass(frozen=True, slots=True)
class PluginInfo:
    """One loaded containerd plugin, as introspection reports it."""

    type: str
    id: str
    exports: Mapping[str, str] = field(default_factory=dict)
    capabilities: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """The daemon's version string (e.g. `1.6.20~ds1`) and revision."""

    version: str
    revision: str


@dataclass(frozen=True, slots=True)
class ImageChange:
    """An image record written: its name and the labels it has now."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)


class ImageCreated(ImageChange):
    __slots__ = ()


class ImageUpdated(ImageChange):
    __slots__ = ()


@dataclass(frozen=True, slots=True)
class ImageDeleted:
    name: str


@dataclass(frozen=True, slots=True)
class ContentCreated:
    digest: str
    size: int


@dataclass(frozen=True, slots=True)
class ContentDeleted:
    digest: str


ContainerdEvent = ImageCreated | ImageUpdated | ImageDeleted | ContentCreated | ContentDeleted


@dataclass(frozen=True, slots=True)
class Envelope:
    """One event as published by containerd.

    `event` is None for payload types we do not decode (tasks, containers, snapshots...);
    `type_url` still names them.
    """

    topic: str
    namespace: str
    event: ContainerdEvent | None
    type_url: str = ""
    timestamp: datetime | None = None
