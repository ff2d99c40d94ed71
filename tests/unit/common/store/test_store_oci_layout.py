"""OCI layout store details the shared contract suite does not pin down: naming, safety, pruning."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.common.oci.document import (
    ANNOTATION_CONTAINERD_NAME,
    ANNOTATION_REF_NAME,
    DocumentError,
    entry_name,
    split_digest,
)
from services.common.store.oci_layout import (
    LayoutSnapshot,
    OciLayoutStore,
    diff_snapshots,
)
from services.common.store.protocol import (
    ContentNotFoundError,
    ContentStore,
    Descriptor,
    EventKind,
    StoreEvent,
    StoreUnavailableError,
)
from tests.harness.images import BuiltImage, build_image

WAIT_S = 30.0


async def collect(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([c async for c in chunks])


def write_index(layout: Path, entries: list[dict[str, object]]) -> None:
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": entries}))


def entry(image: BuiltImage, annotations: dict[str, str]) -> dict[str, object]:
    return {
        "mediaType": image.target.media_type,
        "digest": image.target.digest,
        "size": image.target.size,
        "annotations": annotations,
    }


@pytest.mark.parametrize(
    ("annotations", "bare_repo", "expected"),
    [
        (
            {ANNOTATION_CONTAINERD_NAME: "docker.io/a/b:1", ANNOTATION_REF_NAME: "1"},
            None,
            "docker.io/a/b:1",
        ),
        ({ANNOTATION_REF_NAME: "docker.io/a/b:2"}, None, "docker.io/a/b:2"),
        ({ANNOTATION_REF_NAME: "3"}, None, None),
        # A `:` makes it a reference (no tag holds one), taken as written.
        ({ANNOTATION_REF_NAME: "app:3"}, "docker.io/library/x", "app:3"),
        ({ANNOTATION_REF_NAME: "3"}, "docker.io/library/app", "docker.io/library/app:3"),
        ({}, "docker.io/library/app", None),
        ({ANNOTATION_CONTAINERD_NAME: ""}, None, None),
    ],
)
def test_naming_rule(
    annotations: dict[str, str], bare_repo: str | None, expected: str | None
) -> None:
    assert entry_name(annotations, bare_repo) == expected


@pytest.mark.parametrize(
    "digest",
    [
        "sha256:../../../../etc/passwd",
        "sha256:" + "A" * 64,
        "sha256:" + "a" * 63,
        "sha256:" + "a" * 65,
        "sha512:" + "a" * 64,
        "md5:" + "a" * 32,
        "sha256/" + "a" * 64,
        "a" * 64,
        "",
    ],
)
async def test_malformed_digests_never_touch_the_filesystem(tmp_path: Path, digest: str) -> None:
    store = OciLayoutStore(tmp_path, create=True)
    assert split_digest(digest) is None
    assert store.blob_file(digest) is None
    assert store.local_path(digest) is None
    with pytest.raises(ContentNotFoundError):
        await store.stat(digest)
    with pytest.raises(ContentNotFoundError):
        await collect(store.read(digest))


async def test_layout_written_by_other_tools_with_bare_tags(tmp_path: Path) -> None:
    image = build_image(tmp_path / "src")
    layout = tmp_path / "layout"
    image.write_oci_layout(layout)
    write_index(layout, [entry(image, {ANNOTATION_REF_NAME: "1.0"})])

    unnamed = OciLayoutStore(layout)
    assert await unnamed.list_images() == []
    with pytest.raises(ContentNotFoundError):
        await unnamed.resolve("docker.io/library/test:1.0")
    # Blobs are served by digest whether or not an image names them.
    assert await unnamed.stat(image.target.digest) == image.target.size

    named = OciLayoutStore(layout, bare_tag_repository="docker.io/library/app")
    assert await named.resolve("docker.io/library/app:1.0") == image.target
    assert [r.name for r in await named.list_images()] == ["docker.io/library/app:1.0"]


async def test_later_entry_of_the_same_name_wins(tmp_path: Path) -> None:
    a = build_image(tmp_path / "a", seed=1)
    b = build_image(tmp_path / "b", seed=2)
    layout = tmp_path / "layout"
    a.write_oci_layout(layout)
    b.write_oci_layout(layout)
    name = "docker.io/library/dup:1"
    write_index(
        layout, [entry(a, {ANNOTATION_REF_NAME: name}), entry(b, {ANNOTATION_REF_NAME: name})]
    )
    assert await OciLayoutStore(layout).resolve(name) == b.target


def test_missing_directory_is_refused_unless_created(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        OciLayoutStore(tmp_path / "nope")
    OciLayoutStore(tmp_path / "nope", create=True)
    assert json.loads((tmp_path / "nope" / "index.json").read_text())["manifests"] == []
    assert (tmp_path / "nope" / "oci-layout").is_file()


def test_set_image_refuses_a_target_it_does_not_hold(tmp_path: Path) -> None:
    store = OciLayoutStore(tmp_path / "layout", create=True)
    with pytest.raises(ContentNotFoundError):
        store.set_image("docker.io/library/x:1", Descriptor("sha256:" + "0" * 64, 1, ""))


def test_add_blob_verifies_the_digest(tmp_path: Path) -> None:
    store = OciLayoutStore(tmp_path / "layout", create=True)
    source = tmp_path / "blob"
    source.write_bytes(b"hello")
    with pytest.raises(ValueError, match="expected"):
        store.add_blob(source, "sha256:" + "0" * 64)
    digest = store.add_blob(source)
    assert store.local_path(digest) is not None
    # Nothing but the blob itself is left in the blob directory.
    assert [p.name for p in (tmp_path / "layout" / "blobs" / "sha256").iterdir()] == [
        digest.removeprefix("sha256:")
    ]


async def test_remove_image_prunes_only_unshared_blobs(tmp_path: Path) -> None:
    image = build_image(tmp_path / "src", platforms=["linux/amd64", "linux/arm64"])
    store = OciLayoutStore(tmp_path / "layout", create=True)
    store.set_image("docker.io/library/one:1", image.target, image.blob_paths)
    store.set_image("docker.io/library/two:1", image.target)
    assert store.remove_image("docker.io/library/one:1") == []
    assert await store.resolve("docker.io/library/two:1") == image.target
    deleted = store.remove_image("docker.io/library/two:1")
    assert sorted(deleted) == sorted(b.digest for b in image.blobs)
    for desc in image.blobs:
        with pytest.raises(ContentNotFoundError):
            await store.stat(desc.digest)
    with pytest.raises(ContentNotFoundError):
        store.remove_image("docker.io/library/two:1")


async def test_watch_reports_image_and_blob_changes_and_ends_on_close(tmp_path: Path) -> None:
    image = build_image(tmp_path / "src", layers=1)
    store = OciLayoutStore(tmp_path / "layout", create=True, poll_interval=0.01)
    watch = store.watch()
    store.set_image(image.name, image.target, image.blob_paths)
    async with asyncio.timeout(WAIT_S):
        assert await anext(watch) == StoreEvent(EventKind.IMAGE_CREATE, image.name)
        store.remove_image(image.name)
        got = [await anext(watch) for _ in range(1 + len(image.blobs))]
    assert got[0] == StoreEvent(EventKind.IMAGE_DELETE, image.name)
    assert sorted(e.subject for e in got[1:]) == sorted(b.digest for b in image.blobs)
    assert {e.kind for e in got[1:]} == {EventKind.CONTENT_DELETE}

    pending = asyncio.ensure_future(anext(watch))
    await store.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(pending, WAIT_S)


def test_half_written_index_keeps_the_previous_images(tmp_path: Path) -> None:
    image = build_image(tmp_path / "src", layers=1)
    layout = tmp_path / "layout"
    image.write_oci_layout(layout)
    store = OciLayoutStore(layout)
    before = store.snapshot()
    (layout / "index.json").write_text('{"schemaVersion": 2, "manif')
    during = store.snapshot(before)
    # A watcher polling now reports nothing, rather than the image being deleted.
    assert during.images == {image.name: image.target}
    assert diff_snapshots(before, during) == []
    with pytest.raises(DocumentError):
        store.snapshot()


async def test_unreadable_layout_is_the_contracts_unavailable_error(tmp_path: Path) -> None:
    # Not a miss: a blob that cannot be read and an index that cannot be parsed are outages,
    # which callers tell apart from "not found" without knowing the backend.
    image = build_image(tmp_path / "src", layers=1)
    layout = tmp_path / "layout"
    image.write_oci_layout(layout)
    store = OciLayoutStore(layout)
    blob = store.blob_file(image.target.digest)
    assert blob is not None
    blob.unlink()
    blob.mkdir()
    with pytest.raises(StoreUnavailableError) as read_failure:
        await collect(store.read(image.target.digest))
    assert isinstance(read_failure.value.__cause__, IsADirectoryError)
    (layout / "index.json").write_text('{"schemaVersion": 2, "manif')
    with pytest.raises(StoreUnavailableError) as index_failure:
        await store.resolve(image.name)
    assert isinstance(index_failure.value.__cause__, DocumentError)
    assert index_failure.value.http_status == 503
    with pytest.raises(ContentNotFoundError) as miss:
        await store.stat("sha256:" + "0" * 64)
    assert miss.value.http_status == 404


def test_diff_snapshots() -> None:
    a = Descriptor("sha256:" + "a" * 64, 1, "x")
    b = Descriptor("sha256:" + "b" * 64, 2, "x")
    old = LayoutSnapshot(
        None, {"r/keep:1": a, "r/gone:1": a, "r/moved:1": a}, frozenset({"d1", "d2"})
    )
    new = LayoutSnapshot(
        None, {"r/keep:1": a, "r/new:1": b, "r/moved:1": b}, frozenset({"d2", "d3"})
    )
    assert diff_snapshots(old, new) == [
        StoreEvent(EventKind.IMAGE_DELETE, "r/gone:1"),
        StoreEvent(EventKind.IMAGE_UPDATE, "r/moved:1"),
        StoreEvent(EventKind.IMAGE_CREATE, "r/new:1"),
        StoreEvent(EventKind.CONTENT_DELETE, "d1"),
    ]
    assert diff_snapshots(new, new) == []


def test_is_a_content_store(tmp_path: Path) -> None:
    assert isinstance(OciLayoutStore(tmp_path, create=True), ContentStore)
