"""The one async containerd client: content, images, events and introspection over the unix socket.

Every call carries the namespace as `containerd-namespace` gRPC metadata. Failures surface as the
exceptions of `services.common.containerd.errors`: NOT_FOUND as `ContainerdNotFoundError` (a
`services.common.store.ContentNotFoundError`), ALREADY_EXISTS as `ContainerdAlreadyExistsError`,
a lost or missing daemon as `ContainerdUnavailableError` (a
`services.common.store.StoreUnavailableError`), anything else as `ContainerdError`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import grpc
from google.protobuf.any_pb2 import Any as AnyPb
from google.protobuf.empty_pb2 import Empty
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp

from services.common.closing import AsyncClosing
from services.common.containerd.errors import (
    ContainerdError,
    ContainerdUnavailableError,
    translate_rpc_error,
    translate_status,
)
from services.common.containerd.events import decode_envelope, scoped_filters
from services.common.containerd.models import (
    CONTENT_PLUGIN_ID,
    CONTENT_PLUGIN_TYPE,
    ContentInfo,
    Envelope,
    Image,
    PluginInfo,
    VersionInfo,
)
from services.common.genproto.containerd.services.content.v1 import (
    content_pb2,
    content_pb2_grpc,
)
from services.common.genproto.containerd.services.events.v1 import events_pb2, events_pb2_grpc
from services.common.genproto.containerd.services.images.v1 import images_pb2, images_pb2_grpc
from services.common.genproto.containerd.services.introspection.v1 import (
    introspection_pb2,
    introspection_pb2_grpc,
)
from services.common.genproto.containerd.services.version.v1 import version_pb2_grpc
from services.common.genproto.containerd.types import descriptor_pb2
from services.common.grpc_channel import channel_options
from services.common.store.protocol import Descriptor

DEFAULT_ADDRESS = "/run/containerd/containerd.sock"
DEFAULT_NAMESPACE = "k8s.io"
NAMESPACE_METADATA_KEY = "containerd-namespace"

# containerd itself caps messages at 16 MiB; blobs are sent in 1 MiB pieces, as its own client does.
MAX_MESSAGE_BYTES = 16 << 20
WRITE_CHUNK_BYTES = 1 << 20

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")

# A restarted containerd is back in well under a second, and the pinner should notice promptly.
_CHANNEL_OPTIONS = channel_options(MAX_MESSAGE_BYTES, reconnect_ms=(100, 2000))


def grpc_target(address: str) -> str:
    """gRPC target for a containerd socket path (a `unix:` target is passed through)."""
    if address.startswith("unix:"):
        return address
    return f"unix://{Path(address).absolute()}"


def _time(ts: Timestamp, present: bool) -> datetime | None:
    return ts.ToDatetime(tzinfo=UTC) if present else None


def _content_info(msg: content_pb2.Info) -> ContentInfo:
    return ContentInfo(
        digest=msg.digest,
        size=msg.size,
        labels=dict(msg.labels),
        created_at=_time(msg.created_at, msg.HasField("created_at")),
        updated_at=_time(msg.updated_at, msg.HasField("updated_at")),
    )


def _image(msg: images_pb2.Image) -> Image:
    return Image(
        name=msg.name,
        target=Descriptor(
            digest=msg.target.digest, size=msg.target.size, media_type=msg.target.media_type
        ),
        labels=dict(msg.labels),
        created_at=_time(msg.created_at, msg.HasField("created_at")),
        updated_at=_time(msg.updated_at, msg.HasField("updated_at")),
    )


def _descriptor_pb(target: Descriptor) -> descriptor_pb2.Descriptor:
    return descriptor_pb2.Descriptor(
        media_type=target.media_type, digest=target.digest, size=target.size
    )


def label_update(labels: Mapping[str, str | None]) -> tuple[dict[str, str], list[str]]:
    """Split a label change into the values to send and the field-mask paths naming them.

    A key mapped to None is removed: its path is sent without a value, which containerd treats as
    deletion. Label keys may contain dots; containerd takes everything after `labels.` as the key.
    """
    values = {k: v for k, v in labels.items() if v is not None}
    paths = [f"labels.{k}" for k in labels]
    return values, paths


async def _chunks(
    data: bytes | Iterable[bytes] | AsyncIterable[bytes],
) -> AsyncIterator[bytes]:
    """Yield `data` as pieces of at most WRITE_CHUNK_BYTES, whatever shape it came in."""
    if isinstance(data, bytes | bytearray | memoryview):
        pieces: AsyncIterable[bytes] | Iterable[bytes] = [bytes(data)]
    else:
        pieces = data
    if isinstance(pieces, AsyncIterable):
        async for piece in pieces:
            for start in range(0, len(piece), WRITE_CHUNK_BYTES):
                yield piece[start : start + WRITE_CHUNK_BYTES]
    else:
        for piece in pieces:
            for start in range(0, len(piece), WRITE_CHUNK_BYTES):
                yield piece[start : start + WRITE_CHUNK_BYTES]


class EventStream:
    """A live `Events.Subscribe` call; iterate it for `Envelope`s, `close()` to end it.

    The subscription is requested when the stream is created. containerd sends nothing until the
    first event, so a caller that must not miss a change it makes itself has to confirm the stream
    is live first (e.g. make a probe change and wait for it to arrive).
    """

    def __init__(
        self, call: grpc.aio.UnaryStreamCall[events_pb2.SubscribeRequest, events_pb2.Envelope]
    ) -> None:
        self._call = call
        self._closed = False

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Envelope:
        if self._closed:
            raise StopAsyncIteration
        try:
            msg = await self._call.read()
        except grpc.aio.AioRpcError as err:
            if self._closed:
                raise StopAsyncIteration from None
            raise translate_rpc_error(err, "events subscription") from err
        except asyncio.CancelledError:
            if self._closed:
                raise StopAsyncIteration from None
            raise
        if msg is grpc.aio.EOF:
            # containerd never ends a subscription by itself: an end is a lost daemon.
            self._closed = True
            raise ContainerdUnavailableError("events subscription ended by containerd")
        assert isinstance(msg, events_pb2.Envelope)
        return decode_envelope(msg)

    def close(self) -> None:
        """End the subscription; iteration stops."""
        self._closed = True
        self._call.cancel()

    async def aclose(self) -> None:
        self.close()


class ContainerdClient(AsyncClosing):
    """Async client of one containerd daemon, scoped to one namespace.

    Create it inside a running event loop; `close()` (or `async with`) releases the channel.
    `with_namespace()` gives a view sharing the same channel under another namespace.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        namespace: str = DEFAULT_NAMESPACE,
        *,
        _channel: grpc.aio.Channel | None = None,
    ) -> None:
        self.address = address
        self.namespace = namespace
        self._owns_channel = _channel is None
        self._channel = (
            grpc.aio.insecure_channel(grpc_target(address), options=_CHANNEL_OPTIONS)
            if _channel is None
            else _channel
        )
        self._metadata = ((NAMESPACE_METADATA_KEY, namespace),)
        self._content: content_pb2_grpc.ContentAsyncStub = content_pb2_grpc.ContentStub(
            self._channel
        )
        self._images: images_pb2_grpc.ImagesAsyncStub = images_pb2_grpc.ImagesStub(self._channel)
        self._events: events_pb2_grpc.EventsAsyncStub = events_pb2_grpc.EventsStub(self._channel)
        self._introspection: introspection_pb2_grpc.IntrospectionAsyncStub = (
            introspection_pb2_grpc.IntrospectionStub(self._channel)
        )
        self._version: version_pb2_grpc.VersionAsyncStub = version_pb2_grpc.VersionStub(
            self._channel
        )

    def with_namespace(self, namespace: str) -> ContainerdClient:
        """A client for `namespace` sharing this client's connection (closing it is a no-op)."""
        return ContainerdClient(self.address, namespace, _channel=self._channel)

    async def close(self) -> None:
        """Close the connection when this client opened it (not a with_namespace() view)."""
        if self._owns_channel:
            await self._channel.close()

    async def wait_connected(self) -> VersionInfo:
        """Wait until containerd answers (e.g. after a restart) and return its version.

        Waits for ever: bound it with `asyncio.timeout()` where a deadline matters.
        """
        while True:
            try:
                return await self.version()
            except ContainerdUnavailableError:
                # channel_ready() returns at once while the channel is READY, so a daemon that
                # accepts connections but fails calls must not make this loop spin.
                await self._channel.channel_ready()
                await asyncio.sleep(0.05)

    async def _unary(
        self,
        rpc: grpc.aio.UnaryUnaryMultiCallable[_Request, _Response],
        request: _Request,
        subject: str,
    ) -> _Response:
        """One unary call in this namespace; a failure raised as our exception about `subject`."""
        try:
            return await rpc(request, metadata=self._metadata)
        except grpc.aio.AioRpcError as err:
            raise translate_rpc_error(err, subject) from err

    # --- version and introspection ----------------------------------------------------------

    async def version(self) -> VersionInfo:
        resp = await self._unary(self._version.Version, Empty(), "version")
        return VersionInfo(version=resp.version, revision=resp.revision)

    async def plugins(self) -> list[PluginInfo]:
        """Every plugin the daemon knows, with what each exports (e.g. the content root)."""
        resp = await self._unary(
            self._introspection.Plugins, introspection_pb2.PluginsRequest(), "introspection"
        )
        return [
            PluginInfo(
                type=p.type, id=p.id, exports=dict(p.exports), capabilities=tuple(p.capabilities)
            )
            for p in resp.plugins
        ]

    async def content_root(self) -> Path:
        """Directory of containerd's content store (blobs under `blobs/<alg>/<hex>`)."""
        for plugin in await self.plugins():
            if plugin.type == CONTENT_PLUGIN_TYPE and plugin.id == CONTENT_PLUGIN_ID:
                root = plugin.exports.get("root")
                if root:
                    return Path(root)
        raise ContainerdError("containerd's content plugin does not export its root")

    # --- content ------------------------------------------------------------------------------

    async def content_info(self, digest: str) -> ContentInfo:
        resp = await self._unary(self._content.Info, content_pb2.InfoRequest(digest=digest), digest)
        return _content_info(resp.info)

    async def read_content(
        self, digest: str, offset: int = 0, size: int = 0
    ) -> AsyncIterator[bytes]:
        """Stream `size` bytes of `digest` from `offset` (size 0: to the end).

        ContainerdNotFoundError is raised on the first iteration when the content is absent.
        """
        call = self._content.Read(
            content_pb2.ReadContentRequest(digest=digest, offset=offset, size=size),
            metadata=self._metadata,
        )
        try:
            async for resp in call:
                if resp.data:
                    yield resp.data
        except grpc.aio.AioRpcError as err:
            raise translate_rpc_error(err, digest) from err
        finally:
            call.cancel()

    async def write_content(
        self,
        ref: str,
        data: bytes | Iterable[bytes] | AsyncIterable[bytes],
        *,
        expected: str,
        size: int,
        labels: Mapping[str, str] | None = None,
    ) -> str:
        """Ingest a blob under `ref` and commit it as `expected` with `labels`; return its digest.

        containerd verifies size and digest at commit. Raises ContainerdAlreadyExistsError before
        sending any data when `expected` is already in the namespace. Content nothing refers to
        (no image, no `containerd.io/gc.root` label) may be garbage collected.
        """
        call = self._content.Write(metadata=self._metadata)
        action = content_pb2.WriteAction
        try:
            # Opening with the expected digest and size makes containerd refuse known content up
            # front; an interrupted earlier ingest of the same ref is reset by writing at 0.
            await self._exchange(
                call,
                content_pb2.WriteContentRequest(
                    action=action.STAT, ref=ref, total=size, expected=expected
                ),
            )
            offset = 0
            async for chunk in _chunks(data):
                resp = await self._exchange(
                    call,
                    content_pb2.WriteContentRequest(
                        action=action.WRITE, ref=ref, offset=offset, data=chunk
                    ),
                )
                offset = resp.offset
            resp = await self._exchange(
                call,
                content_pb2.WriteContentRequest(
                    action=action.COMMIT,
                    ref=ref,
                    offset=offset,
                    total=size,
                    expected=expected,
                    labels=dict(labels or {}),
                ),
            )
            await call.done_writing()
            return resp.digest or expected
        except grpc.aio.AioRpcError as err:
            raise translate_rpc_error(err, f"{expected} (ref {ref})") from err
        finally:
            call.cancel()

    @staticmethod
    async def _exchange(
        call: grpc.aio.StreamStreamCall[
            content_pb2.WriteContentRequest, content_pb2.WriteContentResponse
        ],
        request: content_pb2.WriteContentRequest,
    ) -> content_pb2.WriteContentResponse:
        # containerd answers every write request with one response; wait for it before the next
        # so an error (digest mismatch, locked ref) stops the upload at once.
        await call.write(request)
        resp = await call.read()
        if resp is grpc.aio.EOF:
            # The server ended the stream: its final status says why.
            code = await call.code()
            details = await call.details()
            raise translate_status(code, details or "stream ended early", f"write {request.ref}")
        assert isinstance(resp, content_pb2.WriteContentResponse)
        return resp

    async def update_content_labels(
        self, digest: str, labels: Mapping[str, str | None]
    ) -> ContentInfo:
        """Set (value) or remove (None) the given labels of `digest`, leaving the others alone."""
        values, paths = label_update(labels)
        return await self._update_content(digest, values, paths)

    async def replace_content_labels(self, digest: str, labels: Mapping[str, str]) -> ContentInfo:
        """Make `labels` the complete label set of `digest`."""
        return await self._update_content(digest, dict(labels), ["labels"])

    async def _update_content(
        self, digest: str, labels: dict[str, str], paths: list[str]
    ) -> ContentInfo:
        request = content_pb2.UpdateRequest(
            info=content_pb2.Info(digest=digest, labels=labels),
            update_mask=FieldMask(paths=paths),
        )
        resp = await self._unary(self._content.Update, request, digest)
        return _content_info(resp.info)

    async def delete_content(self, digest: str) -> None:
        await self._unary(
            self._content.Delete, content_pb2.DeleteContentRequest(digest=digest), digest
        )

    async def list_content(self, *filters: str) -> list[ContentInfo]:
        """Every blob of the namespace matching all of `filters` (containerd filter syntax)."""
        call = self._content.List(
            content_pb2.ListContentRequest(filters=list(filters)), metadata=self._metadata
        )
        out: list[ContentInfo] = []
        try:
            async for resp in call:
                out.extend(_content_info(info) for info in resp.info)
        except grpc.aio.AioRpcError as err:
            raise translate_rpc_error(err, "content list") from err
        return out

    # --- images -------------------------------------------------------------------------------

    async def get_image(self, name: str) -> Image:
        resp = await self._unary(self._images.Get, images_pb2.GetImageRequest(name=name), name)
        return _image(resp.image)

    async def list_images(self, *filters: str) -> list[Image]:
        """Images matching any of `filters` (containerd filter syntax: `name~="^docker.io/"`)."""
        resp = await self._unary(
            self._images.List, images_pb2.ListImagesRequest(filters=list(filters)), "image list"
        )
        return [_image(img) for img in resp.images]

    async def create_image(
        self, name: str, target: Descriptor, labels: Mapping[str, str] | None = None
    ) -> Image:
        """Create image `name`; ContainerdAlreadyExistsError when the name is taken."""
        image = images_pb2.Image(name=name, target=_descriptor_pb(target), labels=labels or {})
        resp = await self._unary(
            self._images.Create, images_pb2.CreateImageRequest(image=image), name
        )
        return _image(resp.image)

    async def update_image(
        self,
        name: str,
        *,
        target: Descriptor | None = None,
        labels: Mapping[str, str | None] | None = None,
    ) -> Image:
        """Change the target and/or the given labels (None removes a label) of image `name`."""
        values, paths = label_update(labels or {})
        image = images_pb2.Image(name=name, labels=values)
        if target is not None:
            image.target.CopyFrom(_descriptor_pb(target))
            paths.append("target")
        if not paths:
            return await self.get_image(name)
        return await self._update_image(image, paths)

    async def replace_image_labels(self, name: str, labels: Mapping[str, str]) -> Image:
        """Make `labels` the complete label set of image `name`."""
        return await self._update_image(images_pb2.Image(name=name, labels=labels), ["labels"])

    async def _update_image(self, image: images_pb2.Image, paths: list[str]) -> Image:
        request = images_pb2.UpdateImageRequest(image=image, update_mask=FieldMask(paths=paths))
        resp = await self._unary(self._images.Update, request, image.name)
        return _image(resp.image)

    async def delete_image(self, name: str, *, sync: bool = False) -> None:
        """Delete image `name`; with `sync`, containerd garbage-collects before answering."""
        await self._unary(
            self._images.Delete, images_pb2.DeleteImageRequest(name=name, sync=sync), name
        )

    # --- events -------------------------------------------------------------------------------

    def subscribe(self, *filters: str, all_namespaces: bool = False) -> EventStream:
        """Subscribe to events matching any of `filters` (e.g. `topic=="/images/create"`).

        Only this client's namespace is delivered unless `all_namespaces`. Must be called in a
        running event loop.
        """
        scoped = scoped_filters(filters, None if all_namespaces else self.namespace)
        call = self._events.Subscribe(
            events_pb2.SubscribeRequest(filters=scoped), metadata=self._metadata
        )
        return EventStream(call)

    async def publish(self, topic: str, type_url: str, value: bytes = b"") -> None:
        """Publish an event in this client's namespace (containerd does not decode `value`).

        Used to prove a subscription is live: publish a probe on a topic only that subscriber
        listens to and wait for it to come back.
        """
        request = events_pb2.PublishRequest(
            topic=topic, event=AnyPb(type_url=type_url, value=value)
        )
        await self._unary(self._events.Publish, request, f"publish {topic}")
