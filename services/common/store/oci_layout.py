"""Content store over an OCI image layout directory: the embedded default for dev boxes and demo.

Layout: `oci-layout`, `index.json` (its entries name the images), `blobs/<alg>/<hex>`.

Naming rule (what `resolve` and `list_images` see): each entry of index.json gets at most one
image name, by `services.common.oci.document.entry_name` (the rule the air-gap import follows
too): `io.containerd.image.name` verbatim, else `org.opencontainers.image.ref.name` verbatim when
it holds a reference (a `/` or a `:`), else a bare tag there becomes
`<bare_tag_repository>:<tag>` when the store was given a `bare_tag_repository` (e.g.
`docker.io/library/app`) and leaves the entry unnamed otherwise.

Entries without a name are not images of the store (their blobs are still served by digest).
`resolve(reference)` is an exact string match of `reference` against these names; when two
entries carry the same name the later one in index.json wins.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hashlib
import json
import os
import threading
from collections.abc import AsyncIterator, Container, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from services.common.file_signature import FileSignature, file_signature
from services.common.oci.document import (
    ANNOTATION_CONTAINERD_NAME,
    ANNOTATION_REF_NAME,
    MAX_MANIFEST_BYTES,
    DocumentError,
    annotations_of,
    blob_path,
    digest_of,
    entry_name,
    manifest_children,
    parse_index,
    reachable,
    strict_descriptor,
)
from services.common.oci.grammar import SUPPORTED_ALGORITHMS
from services.common.oci.media_types import OCI_INDEX
from services.common.store.file_range import read_range
from services.common.store.protocol import (
    ContentNotFoundError,
    Descriptor,
    EventKind,
    ImageRecord,
    StoreEvent,
    store_failures,
)

LAYOUT_FILE_CONTENT = '{"imageLayoutVersion":"1.0.0"}'

DEFAULT_READ_CHUNK = 1024 * 1024
DEFAULT_POLL_INTERVAL_S = 0.5


def _entry_descriptor(entry: object) -> Descriptor | None:
    try:
        return strict_descriptor(entry, "index.json entry")
    except DocumentError:
        return None


def named_images(
    entries: Iterable[Mapping[str, object]], bare_tag_repository: str | None
) -> dict[str, Descriptor]:
    """Map image name -> target for every named, well-formed entry (later entries win)."""
    images: dict[str, Descriptor] = {}
    for entry in entries:
        desc = _entry_descriptor(entry)
        name = entry_name(annotations_of(entry), bare_tag_repository)
        if desc is not None and name is not None:
            images[name] = desc
    return images


@dataclass(frozen=True, slots=True)
class LayoutSnapshot:
    """What a watcher compares between polls: the named images and the blobs present."""

    index_signature: FileSignature
    images: Mapping[str, Descriptor]
    blobs: frozenset[str] = field(default_factory=frozenset)


def diff_snapshots(old: LayoutSnapshot, new: LayoutSnapshot) -> list[StoreEvent]:
    """Events turning `old` into `new`: image changes by name, then blob deletions."""
    events: list[StoreEvent] = []
    for name in sorted(old.images.keys() | new.images.keys()):
        before, after = old.images.get(name), new.images.get(name)
        if before is None:
            events.append(StoreEvent(EventKind.IMAGE_CREATE, name))
        elif after is None:
            events.append(StoreEvent(EventKind.IMAGE_DELETE, name))
        elif before != after:
            events.append(StoreEvent(EventKind.IMAGE_UPDATE, name))
    events.extend(StoreEvent(EventKind.CONTENT_DELETE, d) for d in sorted(old.blobs - new.blobs))
    return events


class _LayoutWatcher:
    """Polls the layout and yields the differences; armed (first snapshot taken) on creation."""

    def __init__(self, store: OciLayoutStore, interval: float) -> None:
        self._store = store
        self._interval = interval
        self._snapshot = store.snapshot()
        self._pending: collections.deque[StoreEvent] = collections.deque()
        self._closed = asyncio.Event()

    def __aiter__(self) -> _LayoutWatcher:
        return self

    async def __anext__(self) -> StoreEvent:
        while not self._pending:
            if self._closed.is_set():
                raise StopAsyncIteration
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), self._interval)
            if self._closed.is_set():
                raise StopAsyncIteration
            new = await asyncio.to_thread(self._store.snapshot, self._snapshot)
            self._pending.extend(diff_snapshots(self._snapshot, new))
            self._snapshot = new
        return self._pending.popleft()

    async def ready(self) -> bool:
        """In force from creation: the first snapshot was taken then."""
        return True

    async def aclose(self) -> None:
        """Stop: pending and future `__anext__` calls end the iteration."""
        self._closed.set()
        self._store._watchers.discard(self)


class _BlobFiles(Container[str]):
    """The digests whose blob file `layout` holds, each looked up when asked."""

    def __init__(self, layout: OciLayoutStore) -> None:
        self._layout = layout

    def __contains__(self, digest: object) -> bool:
        path = self._layout.blob_file(digest) if isinstance(digest, str) else None
        return path is not None and path.is_file()


class OciLayoutStore:
    """A ContentStore reading an OCI image layout; also writes images into it (tests, demo).

    Reads never block the event loop (file I/O runs in worker threads). Writes from this object
    are atomic (temp file + rename) and serialised by a lock; concurrent writers in other
    processes are not coordinated.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        bare_tag_repository: str | None = None,
        poll_interval: float = DEFAULT_POLL_INTERVAL_S,
        read_chunk: int = DEFAULT_READ_CHUNK,
        create: bool = False,
    ) -> None:
        self.path = Path(path)
        self.bare_tag_repository = bare_tag_repository
        self.poll_interval = poll_interval
        self.read_chunk = read_chunk
        self._write_lock = threading.Lock()
        self._watchers: set[_LayoutWatcher] = set()
        if create:
            (self.path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
            layout_file = self.path / "oci-layout"
            if not layout_file.exists():
                layout_file.write_text(LAYOUT_FILE_CONTENT)
            if not self.index_path.exists():
                self._write_index([])
        elif not self.path.is_dir():
            raise FileNotFoundError(f"no OCI layout directory at {self.path}")

    async def __aenter__(self) -> OciLayoutStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def index_path(self) -> Path:
        return self.path / "index.json"

    def blob_file(self, digest: str) -> Path | None:
        """Where blob `digest` lives (existing or not); None when `digest` is malformed."""
        return blob_path(self.path, digest)

    # --- ContentStore -----------------------------------------------------------------------

    async def resolve(self, reference: str) -> Descriptor:
        with store_failures(OSError, DocumentError):
            images = await asyncio.to_thread(self._read_images)
        try:
            return images[reference]
        except KeyError:
            raise ContentNotFoundError(reference) from None

    async def stat(self, digest: str) -> int:
        path = self.blob_file(digest)
        if path is None:
            raise ContentNotFoundError(digest)
        with store_failures(OSError):
            try:
                st = await asyncio.to_thread(os.stat, path)
            except (FileNotFoundError, NotADirectoryError):
                raise ContentNotFoundError(digest) from None
        return st.st_size

    async def read(
        self, digest: str, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        """Stream the range in `read_chunk` pieces, cut at the end (empty past the end)."""
        if offset < 0 or (length is not None and length < 0):
            raise ValueError(f"bad range offset={offset} length={length}")
        path = self.blob_file(digest)
        if path is None:
            raise ContentNotFoundError(digest)
        with store_failures(OSError):
            try:
                fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
            except (FileNotFoundError, NotADirectoryError):
                raise ContentNotFoundError(digest) from None
            try:
                size = os.fstat(fd).st_size
            except OSError:
                os.close(fd)
                raise
            end = size if length is None else min(size, offset + length)
            shrank = functools.partial(OSError, f"{path} shrank while being read")
            async with contextlib.aclosing(
                read_range(fd, offset, end, self.read_chunk, shrank)
            ) as chunks:
                async for chunk in chunks:
                    yield chunk

    def local_path(self, digest: str) -> Path | None:
        path = self.blob_file(digest)
        if path is None or not path.is_file():
            return None
        return path

    async def list_images(self) -> list[ImageRecord]:
        images = await asyncio.to_thread(self._read_images)
        return [ImageRecord(name, target) for name, target in sorted(images.items())]

    async def digests(self) -> set[str]:
        return set(await asyncio.to_thread(self._list_blobs))

    def watch(self) -> _LayoutWatcher:
        """Poll every `poll_interval` s; changes made after this call are reported.

        Image events come from diffing the named images of index.json (re-read when its inode,
        size or mtime change); CONTENT_DELETE is reported for each blob file that disappeared.
        Changes undone between two polls are not seen.
        """
        watcher = _LayoutWatcher(self, self.poll_interval)
        self._watchers.add(watcher)
        return watcher

    async def close(self) -> None:
        for watcher in list(self._watchers):
            await watcher.aclose()

    # --- snapshots (blocking; run in threads by async callers) ------------------------------

    def _read_entries(self) -> list[dict[str, object]]:
        try:
            data = self.index_path.read_bytes()
        except FileNotFoundError:
            return []
        return parse_index(data)

    def _read_images(self) -> dict[str, Descriptor]:
        return named_images(self._read_entries(), self.bare_tag_repository)

    def _list_blobs(self) -> frozenset[str]:
        found: set[str] = set()
        for algorithm, pattern in SUPPORTED_ALGORITHMS.items():
            try:
                names = os.listdir(self.path / "blobs" / algorithm)
            except FileNotFoundError:
                continue
            found.update(f"{algorithm}:{n}" for n in names if pattern.fullmatch(n))
        return frozenset(found)

    def snapshot(self, previous: LayoutSnapshot | None = None) -> LayoutSnapshot:
        """The current images and blobs; reuses `previous` images when index.json is unchanged.

        An index.json that cannot be parsed (caught mid-write by a non-atomic writer) keeps the
        previous images, so a watcher never reports spurious deletions.
        """
        signature = file_signature(self.index_path)
        if previous is not None and signature == previous.index_signature:
            images: Mapping[str, Descriptor] = previous.images
        else:
            try:
                images = self._read_images()
            except DocumentError:
                if previous is None:
                    raise
                images, signature = previous.images, previous.index_signature
        return LayoutSnapshot(signature, images, self._list_blobs())

    # --- writing (tests, demo, importers) ---------------------------------------------------

    def add_blob(self, source: Path, digest: str | None = None) -> str:
        """Copy file `source` in as a sha256 blob (verified against `digest` when given)."""
        blobs_dir = self.path / "blobs" / "sha256"
        blobs_dir.mkdir(parents=True, exist_ok=True)
        if digest is not None:
            existing = self.blob_file(digest)
            if existing is None:
                raise ValueError(f"malformed digest {digest!r}")
            if existing.is_file():
                return digest
        hasher = hashlib.sha256()
        tmp = blobs_dir / f".tmp-{os.getpid()}-{os.urandom(6).hex()}"
        try:
            with source.open("rb") as src, tmp.open("wb") as dst:
                while chunk := src.read(DEFAULT_READ_CHUNK):
                    hasher.update(chunk)
                    dst.write(chunk)
            actual = "sha256:" + hasher.hexdigest()
            if digest is not None and actual != digest:
                raise ValueError(f"{source} has digest {actual}, expected {digest}")
            os.replace(tmp, blobs_dir / hasher.hexdigest())
        finally:
            tmp.unlink(missing_ok=True)
        return actual

    def add_blob_bytes(self, data: bytes) -> str:
        """Store `data` as a sha256 blob; returns its digest."""
        digest = digest_of(data)
        path = self.blob_file(digest)
        assert path is not None
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".tmp-{os.getpid()}-{os.urandom(6).hex()}")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return digest

    def set_image(
        self, name: str, target: Descriptor, blob_files: Mapping[str, Path] | None = None
    ) -> None:
        """Name `target` as image `name`, copying `blob_files` (digest -> file) in first.

        Blobs land before index.json changes, so a reader never sees a name whose content is
        missing. An existing image of that name is replaced.
        """
        for digest, source in (blob_files or {}).items():
            self.add_blob(source, digest)
        target_file = self.blob_file(target.digest)
        if target_file is None or not target_file.is_file():
            raise ContentNotFoundError(target.digest)
        with self._write_lock:
            entries = [e for e in self._read_entries() if not self._entry_is(e, name)]
            entries.append(
                {
                    "mediaType": target.media_type,
                    "digest": target.digest,
                    "size": target.size,
                    "annotations": {ANNOTATION_CONTAINERD_NAME: name, ANNOTATION_REF_NAME: name},
                }
            )
            self._write_index(entries)

    def remove_image(self, name: str, *, prune: bool = True) -> list[str]:
        """Drop image `name` (ContentNotFoundError when absent); with `prune`, delete its blobs
        that no remaining index.json entry reaches. Returns the digests deleted."""
        with self._write_lock:
            entries = self._read_entries()
            removed = [e for e in entries if self._entry_is(e, name)]
            if not removed:
                raise ContentNotFoundError(name)
            kept = [e for e in entries if not self._entry_is(e, name)]
            self._write_index(kept)
            if not prune:
                return []
            still_used = self._reachable(kept)
            deleted: list[str] = []
            for digest in sorted(self._reachable(removed) - still_used):
                path = self.blob_file(digest)
                if path is not None and path.is_file():
                    path.unlink()
                    deleted.append(digest)
            return deleted

    def _entry_is(self, entry: Mapping[str, object], name: str) -> bool:
        return entry_name(annotations_of(entry), self.bare_tag_repository) == name

    def _reachable(self, entries: Iterable[Mapping[str, object]]) -> frozenset[str]:
        """The blobs the layout holds that `entries` reach, however deep (this decides what a
        prune deletes)."""
        targets = [d for d in (_entry_descriptor(e) for e in entries) if d is not None]
        return reachable(targets, self._children, _BlobFiles(self))

    def _children(self, desc: Descriptor) -> tuple[Descriptor, ...] | None:
        path = self.blob_file(desc.digest)
        if path is None or desc.size > MAX_MANIFEST_BYTES:
            return None
        return manifest_children(path.read_bytes(), desc.media_type)

    def _write_index(self, entries: list[dict[str, object]]) -> None:
        doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
        tmp = self.path / f".index.json.tmp-{os.getpid()}-{threading.get_ident()}"
        tmp.write_text(json.dumps(doc, indent=2))
        os.replace(tmp, self.index_path)
