"""The pure parts of the containerd client and store: event decoding, filters, labels, windows."""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime
from pathlib import Path

import pytest
from google.protobuf.any_pb2 import Any as AnyPb

from services.common.containerd.client import grpc_target, label_update
from services.common.containerd.events import decode_envelope, decode_payload, scoped_filters
from services.common.containerd.models import (
    ContentDeleted,
    Envelope,
    ImageCreated,
    ImageDeleted,
    ImageUpdated,
)
from services.common.genproto.containerd.events import content_pb2 as content_events
from services.common.genproto.containerd.events import image_pb2 as image_events
from services.common.genproto.containerd.services.events.v1 import events_pb2
from services.common.store.containerd_store import read_window
from services.common.store.containerd_watch import store_event
from services.common.store.protocol import EventKind, StoreEvent
from tests.harness.containerd import SANDBOX_IMAGE, render_config


def packed(
    message: image_events.ImageCreate
    | image_events.ImageUpdate
    | image_events.ImageDelete
    | content_events.ContentDelete,
    prefix: str = "",
) -> AnyPb:
    return AnyPb(type_url=prefix + message.DESCRIPTOR.full_name, value=message.SerializeToString())


def test_payloads_decode_with_and_without_type_url_prefix() -> None:
    create = image_events.ImageCreate(name="docker.io/library/a:1", labels={"k": "v"})
    assert decode_payload(packed(create)) == ImageCreated("docker.io/library/a:1", {"k": "v"})
    assert decode_payload(packed(create, "type.googleapis.com/")) == ImageCreated(
        "docker.io/library/a:1", {"k": "v"}
    )
    update = image_events.ImageUpdate(name="n:1")
    assert decode_payload(packed(update)) == ImageUpdated("n:1", {})
    assert decode_payload(packed(image_events.ImageDelete(name="n:1"))) == ImageDeleted("n:1")
    delete = content_events.ContentDelete(digest="sha256:" + "a" * 64)
    assert decode_payload(packed(delete)) == ContentDeleted("sha256:" + "a" * 64)


def test_unknown_or_broken_payloads_decode_to_none() -> None:
    assert decode_payload(AnyPb(type_url="containerd.events.TaskExit", value=b"\x08\x01")) is None
    broken = AnyPb(type_url="containerd.services.images.v1.ImageCreate", value=b"\x0a\xff")
    assert decode_payload(broken) is None


def test_envelope_keeps_topic_namespace_and_time() -> None:
    msg = events_pb2.Envelope(
        namespace="k8s.io",
        topic="/images/delete",
        event=packed(image_events.ImageDelete(name="x:1")),
    )
    msg.timestamp.FromDatetime(datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC))
    env = decode_envelope(msg)
    assert env.topic == "/images/delete"
    assert env.namespace == "k8s.io"
    assert env.event == ImageDeleted("x:1")
    assert env.type_url == "containerd.services.images.v1.ImageDelete"
    assert env.timestamp == datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)


def test_filters_are_scoped_to_the_namespace_in_every_alternative() -> None:
    assert scoped_filters([], "k8s.io") == ['namespace=="k8s.io"']
    assert scoped_filters(['topic=="/a"', 'topic=="/b"'], "ns") == [
        'namespace=="ns",topic=="/a"',
        'namespace=="ns",topic=="/b"',
    ]
    assert scoped_filters(['topic=="/a"'], None) == ['topic=="/a"']


def test_label_update_sends_paths_for_removed_labels_without_values() -> None:
    values, paths = label_update({"io.cri-containerd.pinned": "pinned", "gone": None})
    assert values == {"io.cri-containerd.pinned": "pinned"}
    assert paths == ["labels.io.cri-containerd.pinned", "labels.gone"]


def test_grpc_target_for_socket_paths() -> None:
    assert (
        grpc_target("/run/containerd/containerd.sock") == "unix:///run/containerd/containerd.sock"
    )
    assert grpc_target("unix:///x.sock") == "unix:///x.sock"


@pytest.mark.parametrize(
    ("size", "offset", "length", "window"),
    [
        (100, 0, None, (0, 100)),
        (100, 10, 20, (10, 30)),
        (100, 90, 50, (90, 100)),
        (100, 100, None, (100, 100)),
        (100, 150, 10, (100, 100)),
        (0, 0, None, (0, 0)),
    ],
)
def test_read_window(size: int, offset: int, length: int | None, window: tuple[int, int]) -> None:
    assert read_window(size, offset, length) == window


def test_read_window_refuses_negative_values() -> None:
    with pytest.raises(ValueError):
        read_window(10, -1, None)
    with pytest.raises(ValueError):
        read_window(10, 0, -1)


def test_store_events_from_containerd_events() -> None:
    def env(event: ImageCreated | ImageUpdated | ImageDeleted | ContentDeleted | None) -> Envelope:
        return Envelope(topic="/t", namespace="ns", event=event)

    assert store_event(env(ImageCreated("a:1"))) == StoreEvent(EventKind.IMAGE_CREATE, "a:1")
    assert store_event(env(ImageUpdated("a:1"))) == StoreEvent(EventKind.IMAGE_UPDATE, "a:1")
    assert store_event(env(ImageDeleted("a:1"))) == StoreEvent(EventKind.IMAGE_DELETE, "a:1")
    assert store_event(env(ContentDeleted("sha256:1"))) == StoreEvent(
        EventKind.CONTENT_DELETE, "sha256:1"
    )
    assert store_event(env(None)) is None


def test_harness_config_keeps_every_path_in_the_work_dir() -> None:
    work = Path("/tmp/pm-ctd-x")
    text = render_config(
        root=work / "root",
        state=work / "state",
        address=work / "c.sock",
        hosts_dir=work / "certs.d",
        work=work,
        snapshotter="overlayfs",
    )
    config = tomllib.loads(text)
    assert config["version"] == 2
    assert config["grpc"]["address"] == "/tmp/pm-ctd-x/c.sock"
    cri = config["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["sandbox_image"] == SANDBOX_IMAGE
    assert cri["registry"]["config_path"] == "/tmp/pm-ctd-x/certs.d"
    assert cri["containerd"]["discard_unpacked_layers"] is False
    assert "io.containerd.snapshotter.v1.btrfs" in config["disabled_plugins"]
