"""Decoding of containerd event envelopes (an `Any` payload per topic) into our event records."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC

from google.protobuf.any_pb2 import Any as AnyPb
from google.protobuf.message import DecodeError, Message

from services.common.containerd.models import (
    ContainerdEvent,
    ContentCreated,
    ContentDeleted,
    Envelope,
    ImageCreated,
    ImageDeleted,
    ImageUpdated,
)
from services.common.genproto.containerd.events import content_pb2 as content_events
from services.common.genproto.containerd.events import image_pb2 as image_events
from services.common.genproto.containerd.services.events.v1 import events_pb2


def _image_create(raw: bytes) -> ContainerdEvent:
    msg = image_events.ImageCreate.FromString(raw)
    return ImageCreated(name=msg.name, labels=dict(msg.labels))


def _image_update(raw: bytes) -> ContainerdEvent:
    msg = image_events.ImageUpdate.FromString(raw)
    return ImageUpdated(name=msg.name, labels=dict(msg.labels))


def _image_delete(raw: bytes) -> ContainerdEvent:
    return ImageDeleted(name=image_events.ImageDelete.FromString(raw).name)


def _content_create(raw: bytes) -> ContainerdEvent:
    msg = content_events.ContentCreate.FromString(raw)
    return ContentCreated(digest=msg.digest, size=msg.size)


def _content_delete(raw: bytes) -> ContainerdEvent:
    return ContentDeleted(digest=content_events.ContentDelete.FromString(raw).digest)


def _full_name(message: type[Message]) -> str:
    return str(message.DESCRIPTOR.full_name)


# containerd names payloads by their protobuf full name, without the usual
# `type.googleapis.com/` prefix; both spellings are accepted below.
_DECODERS: dict[str, Callable[[bytes], ContainerdEvent]] = {
    _full_name(image_events.ImageCreate): _image_create,
    _full_name(image_events.ImageUpdate): _image_update,
    _full_name(image_events.ImageDelete): _image_delete,
    _full_name(content_events.ContentCreate): _content_create,
    _full_name(content_events.ContentDelete): _content_delete,
}


def decode_payload(payload: AnyPb) -> ContainerdEvent | None:
    """Decode an event payload we know; None for other types or undecodable bytes."""
    type_name = payload.type_url.rsplit("/", 1)[-1]
    decoder = _DECODERS.get(type_name)
    if decoder is None:
        return None
    try:
        return decoder(payload.value)
    except DecodeError:
        return None


def decode_envelope(msg: events_pb2.Envelope) -> Envelope:
    """Turn a received envelope into an `Envelope` record."""
    timestamp = msg.timestamp.ToDatetime(tzinfo=UTC) if msg.HasField("timestamp") else None
    return Envelope(
        topic=msg.topic,
        namespace=msg.namespace,
        event=decode_payload(msg.event) if msg.HasField("event") else None,
        type_url=msg.event.type_url,
        timestamp=timestamp,
    )


def scoped_filters(filters: Sequence[str], namespace: str | None) -> list[str]:
    """Restrict subscription filters to one namespace.

    containerd delivers events of every namespace to every subscriber; filters in the list are
    alternatives (OR) and the comma-separated terms inside one filter must all match (AND), so
    the namespace term is added to each alternative.
    """
    if namespace is None:
        return list(filters)
    term = f'namespace=="{namespace}"'
    if not filters:
        return [term]
    return [f"{term},{f}" for f in filters]
