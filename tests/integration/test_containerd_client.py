"""The containerd client and the containerd content store against a real containerd 1.6."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.common.containerd.client import ContainerdClient
from services.common.containerd.errors import (
    ContainerdAlreadyExistsError,
    ContainerdError,
    ContainerdNotFoundError,
    ContainerdUnavailableError,
)
from services.common.containerd.models import (
    ContentDeleted,
    Envelope,
    ImageCreated,
    ImageDeleted,
    ImageUpdated,
)
from services.common.store.containerd_store import ContainerdStore
from services.common.store.protocol import (
    ContentNotFoundError,
    ContentStore,
    Descriptor,
    EventKind,
    StoreEvent,
)
from tests.harness.containerd import ContainerdDaemon
from tests.harness.containerd_store_factory import make_containerd_store
from tests.harness.event_pump import EventPump
from tests.harness.images import OCI_MANIFEST, build_image

pytestmark = pytest.mark.containerd

# Content written without an image referring to it would be fair game for containerd's GC.
GC_ROOT = {"containerd.io/gc.root": "test"}
PIN = "io.cri-containerd.pinned"
PROBE_PREFIX = "probe.invalid/watch"


def blob(size: int) -> tuple[bytes, str]:
    data = os.urandom(size)
    return data, "sha256:" + hashlib.sha256(data).hexdigest()


async def collect(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([c async for c in chunks])


@pytest.fixture
async def client(
    containerd_daemon: ContainerdDaemon, containerd_namespace: str
) -> AsyncIterator[ContainerdClient]:
    async with ContainerdClient(containerd_daemon.address, containerd_namespace) as c:
        yield c


async def put(client: ContainerdClient, data: bytes, digest: str) -> None:
    await client.write_content(
        f"test-{uuid.uuid4().hex}", data, expected=digest, size=len(data), labels=GC_ROOT
    )


async def live_events(client: ContainerdClient, *filters: str) -> EventPump[Envelope]:
    """A subscription proven live by probe images; probes are skipped from then on."""
    pump: EventPump[Envelope] = EventPump(client.subscribe(*filters))
    data, digest = blob(64)
    await put(client, data, digest)
    target = Descriptor(digest, len(data), OCI_MANIFEST)

    async def probe(n: int) -> None:
        await client.create_image(f"{PROBE_PREFIX}:{n}", target)

    def is_probe(envelope: Envelope) -> bool:
        return isinstance(envelope.event, ImageCreated) and envelope.event.name.startswith(
            PROBE_PREFIX
        )

    await pump.sync(probe, is_probe)
    return pump


async def test_write_info_and_read_ranges(client: ContainerdClient) -> None:
    # Larger than one write message, so the upload spans several WRITE requests.
    data, digest = blob(3 * 1024 * 1024 + 123)
    labels = {**GC_ROOT, "containerd.io/distribution.source.docker.io": "library/test"}
    written = await client.write_content(
        "ref-ranges", data, expected=digest, size=len(data), labels=labels
    )
    assert written == digest

    info = await client.content_info(digest)
    assert info.digest == digest
    assert info.size == len(data)
    assert dict(info.labels) == labels

    assert await collect(client.read_content(digest)) == data
    assert await collect(client.read_content(digest, 1000, 5000)) == data[1000:6000]
    assert await collect(client.read_content(digest, len(data) - 10)) == data[-10:]


async def test_write_from_async_chunks(client: ContainerdClient) -> None:
    data, digest = blob(200_000)

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 7000):
            yield data[start : start + 7000]

    await client.write_content(
        "ref-chunks", pieces(), expected=digest, size=len(data), labels=GC_ROOT
    )
    assert await collect(client.read_content(digest)) == data


async def test_write_refuses_existing_and_wrong_content(client: ContainerdClient) -> None:
    data, digest = blob(1000)
    await put(client, data, digest)
    with pytest.raises(ContainerdAlreadyExistsError):
        await put(client, data, digest)

    other, other_digest = blob(1000)
    with pytest.raises(ContainerdError) as wrong:
        await client.write_content(
            "ref-wrong", other, expected=digest.replace(digest[-4:], "0000"), size=len(other)
        )
    assert not isinstance(wrong.value, ContainerdAlreadyExistsError)
    with pytest.raises(ContainerdNotFoundError):
        await client.content_info(other_digest)


async def test_missing_content_is_not_found(client: ContainerdClient) -> None:
    _, digest = blob(10)
    with pytest.raises(ContentNotFoundError) as info_err:
        await client.content_info(digest)
    assert isinstance(info_err.value, ContainerdNotFoundError)
    assert info_err.value.what == digest
    with pytest.raises(ContainerdNotFoundError):
        await collect(client.read_content(digest))


async def test_update_content_labels(client: ContainerdClient) -> None:
    data, digest = blob(100)
    await put(client, data, digest)
    info = await client.update_content_labels(digest, {"a.example/one": "1", "b": "2"})
    assert dict(info.labels) == {**GC_ROOT, "a.example/one": "1", "b": "2"}
    info = await client.update_content_labels(digest, {"a.example/one": None})
    assert dict(info.labels) == {**GC_ROOT, "b": "2"}
    assert dict((await client.content_info(digest)).labels) == {**GC_ROOT, "b": "2"}
    info = await client.replace_content_labels(digest, GC_ROOT)
    assert dict(info.labels) == GC_ROOT


async def test_content_is_scoped_by_namespace(client: ContainerdClient) -> None:
    data, digest = blob(100)
    await put(client, data, digest)
    other = client.with_namespace(f"pmtest-other-{uuid.uuid4().hex[:8]}")
    with pytest.raises(ContainerdNotFoundError):
        await other.content_info(digest)
    assert (await client.content_info(digest)).size == 100


async def test_image_lifecycle_and_events(client: ContainerdClient) -> None:
    pump = await live_events(client, 'topic~="^/images/"', 'topic=="/content/delete"')
    try:
        data, digest = blob(500)
        await put(client, data, digest)
        target = Descriptor(digest, len(data), OCI_MANIFEST)
        name = "registry.example/team/app:1.0"

        created = await client.create_image(name, target, {"k": "v"})
        assert created.name == name
        assert created.target == target
        assert created.created_at is not None
        with pytest.raises(ContainerdAlreadyExistsError):
            await client.create_image(name, target)

        got = await client.get_image(name)
        assert got.target == target
        assert dict(got.labels) == {"k": "v"}

        names = {image.name for image in await client.list_images()}
        assert name in names
        filtered = await client.list_images('name~="^registry.example/"')
        assert [image.name for image in filtered] == [name]

        pinned = await client.update_image(name, labels={PIN: "pinned"})
        assert dict(pinned.labels) == {"k": "v", PIN: "pinned"}
        unpinned = await client.update_image(name, labels={PIN: None, "k": "w"})
        assert dict(unpinned.labels) == {"k": "w"}

        data2, digest2 = blob(600)
        await put(client, data2, digest2)
        retargeted = await client.update_image(name, target=Descriptor(digest2, 600, OCI_MANIFEST))
        assert retargeted.target.digest == digest2
        assert dict(retargeted.labels) == {"k": "w"}

        await client.delete_image(name)
        with pytest.raises(ContainerdNotFoundError):
            await client.get_image(name)
        with pytest.raises(ContainerdNotFoundError):
            await client.delete_image(name)
        await client.delete_content(digest)

        events = await pump.take(6)
        assert [e.event for e in events] == [
            ImageCreated(name, {"k": "v"}),
            ImageUpdated(name, {"k": "v", PIN: "pinned"}),
            ImageUpdated(name, {"k": "w"}),
            ImageUpdated(name, {"k": "w"}),
            ImageDeleted(name),
            ContentDeleted(digest),
        ]
        assert [e.topic for e in events] == [
            "/images/create",
            "/images/update",
            "/images/update",
            "/images/update",
            "/images/delete",
            "/content/delete",
        ]
        assert {e.namespace for e in events} == {client.namespace}
    finally:
        await pump.close()


async def test_events_of_other_namespaces_are_filtered(client: ContainerdClient) -> None:
    other = client.with_namespace(f"pmtest-other-{uuid.uuid4().hex[:8]}")
    pump = await live_events(client, 'topic~="^/images/"')
    try:
        data, digest = blob(50)
        await put(other, data, digest)
        target = Descriptor(digest, 50, OCI_MANIFEST)
        await other.create_image("registry.example/elsewhere:1", target)
        await put(client, data, digest)
        await client.create_image("registry.example/here:1", target)
        event = await pump.next()
        assert event.event == ImageCreated("registry.example/here:1", {})
        await other.delete_image("registry.example/elsewhere:1")
        await other.delete_content(digest)
    finally:
        await pump.close()


async def test_introspection_and_version(
    client: ContainerdClient, containerd_daemon: ContainerdDaemon
) -> None:
    assert await client.content_root() == containerd_daemon.content_root
    assert (await client.version()).version.startswith("1.")
    plugin_ids = {(p.type, p.id) for p in await client.plugins()}
    assert ("io.containerd.grpc.v1", "cri") in plugin_ids


async def test_lost_daemon_raises_unavailable_and_client_recovers() -> None:
    # A private daemon: stopping the session one would disturb the other tests' fixtures.
    with ContainerdDaemon() as daemon:
        async with ContainerdClient(daemon.address, "pmtest-restart") as client:
            data, digest = blob(100)
            await put(client, data, digest)
            pump = await live_events(client)
            try:
                daemon.kill()
                with pytest.raises(ContainerdUnavailableError):
                    await client.content_info(digest)
                # A live subscription ends with the same error, which tells the caller to resync.
                with pytest.raises(ContainerdUnavailableError):
                    await pump.next()
            finally:
                await pump.close()

            daemon.start()
            assert (await client.wait_connected()).version.startswith("1.")
            assert (await client.content_info(digest)).size == 100

            daemon.restart()
            await client.wait_connected()
            assert (await client.content_info(digest)).size == 100


@pytest.mark.parametrize("form", ["oci", "docker"])
async def test_import_archive_helper(
    containerd_daemon: ContainerdDaemon,
    containerd_namespace: str,
    client: ContainerdClient,
    tmp_path: Path,
    form: str,
) -> None:
    name = "docker.io/library/imported:3"
    if form == "oci":
        platforms = ["linux/amd64", "linux/arm64"]
        image = build_image(tmp_path / "layout", name=name, platforms=platforms)
        archive = image.write_oci_archive(tmp_path / "image.tar")
        expected_target = image.target.digest
    else:
        image = build_image(tmp_path / "layout", name=name, media="docker")
        archive = image.write_docker_archive(tmp_path / "image.tar").path
        expected_target = ""
    await containerd_daemon.import_archive_async(archive, namespace=containerd_namespace)
    assert containerd_daemon.image_names(containerd_namespace) == [name]
    imported = await client.get_image(name)
    if expected_target:
        assert imported.target.digest == expected_target
    # Every blob the target reaches is in the namespace (all platforms, nothing unpacked away).
    for desc in image.blobs if form == "oci" else ():
        assert (await client.content_info(desc.digest)).size == desc.size


# --- the content store ---------------------------------------------------------------------


async def test_store_over_imported_image(
    containerd_daemon: ContainerdDaemon, containerd_namespace: str, tmp_path: Path
) -> None:
    image = build_image(
        tmp_path / "layout",
        name="docker.io/library/sample:1.0",
        layers=2,
        layer_size=300_000,
        platforms=["linux/amd64", "linux/arm64"],
    )
    store = await make_containerd_store(containerd_daemon, containerd_namespace, image)
    try:
        assert isinstance(store, ContentStore)
        assert store.content_root == containerd_daemon.content_root
        assert await store.resolve(image.name) == image.target

        records = await store.list_images()
        assert [(r.name, r.target) for r in records] == [(image.name, image.target)]

        for desc in image.blobs:
            assert await store.stat(desc.digest) == desc.size
            path = store.local_path(desc.digest)
            assert path == containerd_daemon.blob_path(desc.digest)
            assert await collect(store.read(desc.digest)) == image.read_blob(desc.digest)

        layer = image.platforms[1].layers[0].descriptor
        expected = image.read_blob(layer.digest)
        assert await collect(store.read(layer.digest, 1234, 100_000)) == expected[1234:101_234]
        assert await collect(store.read(layer.digest, layer.size - 7)) == expected[-7:]
        assert await collect(store.read(layer.digest, layer.size + 10)) == b""
        with pytest.raises(ValueError):
            await collect(store.read(layer.digest, -1))

        with pytest.raises(ContentNotFoundError):
            await store.resolve("docker.io/library/sample:absent")
        _, unknown = blob(10)
        with pytest.raises(ContentNotFoundError):
            await store.stat(unknown)
        with pytest.raises(ContentNotFoundError):
            await collect(store.read(unknown))
        with pytest.raises(ContentNotFoundError):
            await store.stat("sha256:../../etc/passwd")
        assert store.local_path(unknown) is None
        assert store.local_path("sha256:../../etc/passwd") is None
    finally:
        await store.close()


async def test_store_grpc_read_path_matches_files(
    containerd_daemon: ContainerdDaemon, containerd_namespace: str, client: ContainerdClient
) -> None:
    data, digest = blob(2_500_000)
    await put(client, data, digest)
    store = await ContainerdStore.open(
        containerd_daemon.address, containerd_namespace, fast_path=False
    )
    try:
        assert store.local_path(digest) is None
        assert await collect(store.read(digest)) == data
        assert await collect(store.read(digest, 1_000_000, 1_200_000)) == data[1_000_000:2_200_000]
    finally:
        await store.close()


async def test_store_hides_blobs_of_other_namespaces(
    containerd_daemon: ContainerdDaemon, client: ContainerdClient
) -> None:
    data, digest = blob(100)
    await put(client, data, digest)
    other_ns = f"pmtest-other-{uuid.uuid4().hex[:8]}"
    store = await ContainerdStore.open(containerd_daemon.address, other_ns)
    try:
        # The file is on disk (blobs are shared), but this namespace does not hold the content.
        assert containerd_daemon.blob_path(digest).is_file()
        with pytest.raises(ContentNotFoundError):
            await store.stat(digest)
        with pytest.raises(ContentNotFoundError):
            await collect(store.read(digest))
    finally:
        await store.close()


async def test_store_watch_reports_changes(
    containerd_daemon: ContainerdDaemon, containerd_namespace: str, client: ContainerdClient
) -> None:
    store = await ContainerdStore.open(containerd_daemon.address, containerd_namespace)
    pump: EventPump[StoreEvent] = EventPump(store.watch())
    try:
        data, digest = blob(100)
        await put(client, data, digest)
        target = Descriptor(digest, 100, OCI_MANIFEST)

        async def probe(n: int) -> None:
            await client.create_image(f"{PROBE_PREFIX}:{n}", target)

        await pump.sync(
            probe, lambda e: e.kind is EventKind.IMAGE_CREATE and e.subject.startswith(PROBE_PREFIX)
        )
        name = "docker.io/library/watched:2"
        await client.create_image(name, target)
        await client.update_image(name, labels={PIN: "pinned"})
        await client.delete_image(name)
        await client.delete_content(digest)
        assert await pump.take(4) == [
            StoreEvent(EventKind.IMAGE_CREATE, name),
            StoreEvent(EventKind.IMAGE_UPDATE, name),
            StoreEvent(EventKind.IMAGE_DELETE, name),
            StoreEvent(EventKind.CONTENT_DELETE, digest),
        ]
    finally:
        await pump.close()
        await store.close()
