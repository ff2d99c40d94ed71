"""One content-store contract, run against every backend: in-memory, OCI layout, real containerd.

Each backend is driven through a small factory (`StoreBackend`) that can add a synthetic image
the way that backend really gets images, and delete one, so the cases below never know which
store they talk to.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Protocol

import pytest

from services.common.store.containerd_store import ContainerdStore
from services.common.store.memory import MemoryStore
from services.common.store.oci_layout import OciLayoutStore
from services.common.store.protocol import (
    ContentNotFoundError,
    ContentStore,
    EventKind,
    StoreEvent,
)
from tests.harness.containerd import ContainerdDaemon
from tests.harness.containerd_store_factory import import_image
from tests.harness.event_pump import EventPump
from tests.harness.images import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    BuiltImage,
    build_image,
)

MiB = 1024 * 1024
PROBE_REPO = "docker.io/peermirror-probe/watch"


class StoreBackend(Protocol):
    """A store under test plus the means to change what it holds."""

    store: ContentStore
    # Whether `local_path` is expected to hand out files (False for the in-memory fake).
    has_files: bool

    async def add_image(self, image: BuiltImage) -> None: ...

    async def delete_image(self, name: str) -> None: ...


class MemoryBackend:
    has_files = False

    def __init__(self) -> None:
        self.memory = MemoryStore()
        self.store: ContentStore = self.memory

    async def add_image(self, image: BuiltImage) -> None:
        for desc in image.blobs:
            self.memory.add_blob(image.read_blob(desc.digest))
        self.memory.set_image(image.name, image.target)

    async def delete_image(self, name: str) -> None:
        self.memory.delete_image(name)


class OciLayoutBackend:
    has_files = True

    def __init__(self, path: Path) -> None:
        # A short poll keeps the watch cases quick; the value changes nothing else.
        self.layout = OciLayoutStore(path, create=True, poll_interval=0.05)
        self.store: ContentStore = self.layout

    async def add_image(self, image: BuiltImage) -> None:
        await asyncio.to_thread(self.layout.set_image, image.name, image.target, image.blob_paths)

    async def delete_image(self, name: str) -> None:
        await asyncio.to_thread(self.layout.remove_image, name)


class ContainerdBackend:
    has_files = True

    def __init__(self, daemon: ContainerdDaemon, namespace: str, store: ContainerdStore) -> None:
        self.daemon = daemon
        self.namespace = namespace
        self.store: ContentStore = store

    async def add_image(self, image: BuiltImage) -> None:
        # Through an OCI archive and `ctr images import`, as air-gap tarballs arrive on a node.
        await import_image(self.daemon, self.namespace, image)

    async def delete_image(self, name: str) -> None:
        await self.daemon.ctr_async("images", "rm", name, namespace=self.namespace)


@pytest.fixture(
    params=["memory", "oci-layout", pytest.param("containerd", marks=pytest.mark.containerd)]
)
def backend_kind(request: pytest.FixtureRequest) -> Iterator[str]:
    kind: str = request.param
    if kind == "containerd":
        # Requested here, not in `backend`, so only the containerd cases start a daemon.
        request.getfixturevalue("containerd_namespace")
    yield kind


@pytest.fixture
async def backend(
    backend_kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[StoreBackend]:
    made: StoreBackend
    if backend_kind == "memory":
        made = MemoryBackend()
    elif backend_kind == "oci-layout":
        made = OciLayoutBackend(tmp_path / "layout")
    else:
        daemon: ContainerdDaemon = request.getfixturevalue("containerd_daemon")
        namespace: str = request.getfixturevalue("containerd_namespace")
        made = ContainerdBackend(
            daemon, namespace, await ContainerdStore.open(daemon.address, namespace)
        )
    try:
        yield made
    finally:
        await made.store.close()


IMAGE_KINDS = ["oci", "oci-multi", "docker", "docker-multi"]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, BuiltImage]:
    """One image of each shape; "oci" has layers larger than every backend's read chunk."""
    root = tmp_path_factory.mktemp("contract-images")
    multi = ["linux/amd64", "linux/arm64/v8"]
    return {
        "oci": build_image(
            root / "oci",
            name="docker.io/library/contract-oci:1.0",
            layers=2,
            layer_size=MiB + MiB // 2,
        ),
        "oci-multi": build_image(
            root / "oci-multi",
            name="docker.io/library/contract-multi:1.0",
            platforms=multi,
            layers=1,
        ),
        "docker": build_image(
            root / "docker", name="127.0.0.1:5000/team/contract-docker:v1", media="docker"
        ),
        "docker-multi": build_image(
            root / "docker-multi",
            name="docker.io/team/contract-docker-multi:v2",
            media="docker",
            platforms=multi,
        ),
    }


async def collect(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([c async for c in chunks])


EXPECTED_TARGET_TYPES = {
    "oci": OCI_MANIFEST,
    "oci-multi": OCI_INDEX,
    "docker": DOCKER_MANIFEST,
    "docker-multi": DOCKER_MANIFEST_LIST,
}


@pytest.mark.parametrize("kind", IMAGE_KINDS)
async def test_tag_resolves_to_target(
    backend: StoreBackend, images: dict[str, BuiltImage], kind: str
) -> None:
    image = images[kind]
    await backend.add_image(image)
    target = await backend.store.resolve(image.name)
    assert target == image.target
    assert target.media_type == EXPECTED_TARGET_TYPES[kind]


@pytest.mark.parametrize("kind", IMAGE_KINDS)
async def test_digests_lists_every_blob_of_an_image(
    backend: StoreBackend, images: dict[str, BuiltImage], kind: str
) -> None:
    image = images[kind]
    await backend.add_image(image)
    assert {d.digest for d in image.blobs} <= await backend.store.digests()


@pytest.mark.parametrize("kind", IMAGE_KINDS)
async def test_every_blob_stats_with_its_size(
    backend: StoreBackend, images: dict[str, BuiltImage], kind: str
) -> None:
    image = images[kind]
    await backend.add_image(image)
    # Index, every platform's manifest and config, every layer.
    assert len(image.blobs) > 3
    for desc in image.blobs:
        assert await backend.store.stat(desc.digest) == desc.size


async def test_byte_ranges_read_back_exactly(
    backend: StoreBackend, images: dict[str, BuiltImage]
) -> None:
    image = images["oci"]
    await backend.add_image(image)
    for desc in image.blobs:
        data = image.read_blob(desc.digest)
        size = len(data)
        windows: list[tuple[int, int | None]] = [
            (0, None),  # whole blob
            (0, min(100, size)),  # start
            (size // 3, size // 3),  # middle
            (size - 77, None),  # tail
            (size - 10, 10),  # tail with explicit length
            (size, 0),  # zero length at the very end
            (size, None),  # nothing left at the very end
            (0, 0),  # zero length at the start
        ]
        if size > MiB + 10:
            windows.append((MiB - 5, 10))  # across the 1 MiB chunk boundary of the file backends
        for offset, length in windows:
            expected = data[offset:] if length is None else data[offset : offset + length]
            got = await collect(backend.store.read(desc.digest, offset, length))
            assert got == expected, (desc.digest, offset, length)


async def test_read_past_the_end_is_cut_at_the_end(
    backend: StoreBackend, images: dict[str, BuiltImage]
) -> None:
    image = images["oci"]
    await backend.add_image(image)
    config = image.platforms[0].config
    data = image.read_blob(config.digest)
    assert await collect(backend.store.read(config.digest, 10, 10 * len(data))) == data[10:]


async def test_unknown_digests_are_not_found(backend: StoreBackend) -> None:
    unknown = [
        "sha256:" + hashlib.sha256(b"never stored " + uuid.uuid4().bytes).hexdigest(),
        "sha512:" + hashlib.sha512(b"never stored either").hexdigest(),
    ]
    for digest in unknown:
        with pytest.raises(ContentNotFoundError):
            await backend.store.stat(digest)
        with pytest.raises(ContentNotFoundError):
            await collect(backend.store.read(digest))
        with pytest.raises(ContentNotFoundError):
            await collect(backend.store.read(digest, 5, 10))
        assert backend.store.local_path(digest) is None


async def test_unknown_tags_are_not_found(
    backend: StoreBackend, images: dict[str, BuiltImage]
) -> None:
    image = images["oci"]
    await backend.add_image(image)
    for reference in [
        f"{image.registry}/{image.repository}:missing",
        "docker.io/library/never-added:1.0",
        f"other.example/{image.repository}:{image.tag}",
    ]:
        with pytest.raises(ContentNotFoundError):
            await backend.store.resolve(reference)


async def test_local_path_holds_exactly_the_bytes(
    backend: StoreBackend, images: dict[str, BuiltImage]
) -> None:
    image = images["oci-multi"]
    await backend.add_image(image)
    for desc in image.blobs:
        path = backend.store.local_path(desc.digest)
        assert (path is not None) == backend.has_files
        if path is not None:
            assert path.read_bytes() == image.read_blob(desc.digest)


async def test_list_images_contains_the_image(
    backend: StoreBackend, images: dict[str, BuiltImage]
) -> None:
    for kind in ("oci", "docker-multi"):
        await backend.add_image(images[kind])
    listed = {record.name: record.target for record in await backend.store.list_images()}
    for kind in ("oci", "docker-multi"):
        assert listed[images[kind].name] == images[kind].target


async def test_deleted_image_no_longer_resolves(
    backend: StoreBackend, images: dict[str, BuiltImage]
) -> None:
    image = images["docker"]
    await backend.add_image(image)
    await backend.delete_image(image.name)
    with pytest.raises(ContentNotFoundError):
        await backend.store.resolve(image.name)
    assert image.name not in {r.name for r in await backend.store.list_images()}


@pytest.fixture
async def events(backend: StoreBackend, tmp_path: Path) -> AsyncIterator[EventPump[StoreEvent]]:
    """A watch on the backend proven live: probe images are added until one shows up."""
    pump: EventPump[StoreEvent] = EventPump(backend.store.watch())

    async def probe(n: int) -> None:
        # Subscriptions give no sign of when they are in force, so keep making changes.
        name = f"{PROBE_REPO}:{n}"
        probe_image = await asyncio.to_thread(
            build_image, tmp_path / "probes", name=name, layers=1, layer_size=64, seed=n
        )
        await backend.add_image(probe_image)

    def is_probe(event: StoreEvent) -> bool:
        return event.subject.startswith(PROBE_REPO)

    try:
        await pump.sync(probe, is_probe)
        yield pump
    finally:
        await pump.close()


IMAGE_EVENTS = (EventKind.IMAGE_CREATE, EventKind.IMAGE_UPDATE, EventKind.IMAGE_DELETE)


async def next_image_event(pump: EventPump[StoreEvent]) -> StoreEvent:
    """The next image event (content events may interleave, e.g. containerd's GC)."""
    while True:
        event = await pump.next()
        if event.kind in IMAGE_EVENTS:
            return event


async def test_a_ready_watch_reports_the_next_change(
    backend: StoreBackend, images: dict[str, BuiltImage]
) -> None:
    """`ready()` is the proof callers list after: no probing of their own needed."""
    watch = backend.store.watch()
    assert await watch.ready()
    pump: EventPump[StoreEvent] = EventPump(watch)
    try:
        image = images["oci"]
        await backend.add_image(image)
        assert await next_image_event(pump) == StoreEvent(EventKind.IMAGE_CREATE, image.name)
    finally:
        await pump.close()


async def test_watch_reports_image_create_and_delete(
    backend: StoreBackend, images: dict[str, BuiltImage], events: EventPump[StoreEvent]
) -> None:
    image = images["oci-multi"]
    await backend.add_image(image)
    assert await next_image_event(events) == StoreEvent(EventKind.IMAGE_CREATE, image.name)
    await backend.delete_image(image.name)
    assert await next_image_event(events) == StoreEvent(EventKind.IMAGE_DELETE, image.name)


async def test_watch_reports_retarget_as_update(
    backend: StoreBackend,
    images: dict[str, BuiltImage],
    events: EventPump[StoreEvent],
    tmp_path: Path,
) -> None:
    first = images["oci"]
    await backend.add_image(first)
    assert await next_image_event(events) == StoreEvent(EventKind.IMAGE_CREATE, first.name)
    second = build_image(tmp_path / "retarget", name=first.name, layers=1, seed=99)
    assert second.target != first.target
    await backend.add_image(second)
    assert await next_image_event(events) == StoreEvent(EventKind.IMAGE_UPDATE, first.name)
    assert await backend.store.resolve(first.name) == second.target
