"""Imports one image archive (OCI layout or docker-save tar) into containerd, all or nothing.

Blobs are written as they stream by (members come in any order), under a lease; once the
metadata has been read, every image's tree is walked and checked complete, content labels are
set, and only then are image records created. Any failure deletes the lease, so the content
written for that archive is garbage-collected and no image record points at missing content.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from services.common.containerd.client import ContainerdClient
from services.common.containerd.errors import (
    ContainerdAlreadyExistsError,
    ContainerdNotFoundError,
)
from services.common.errors import PeermirrorError
from services.common.logsetup import get_logger
from services.common.oci.document import digest_matches, digest_of
from services.common.oci.media_types import DOCKER_CONFIG, DOCKER_MANIFEST, is_index_media_type
from services.common.store.protocol import Descriptor
from services.pinner.airgap.budget import DEFAULT_MAX_DESCRIPTORS, DescriptorBudget
from services.pinner.airgap.formats import FileKind
from services.pinner.airgap.ingest import BlobWriter, IngestChannel, Lease
from services.pinner.airgap.layout import (
    DOCKER_MANIFEST_FILE,
    METADATA_MAX_BYTES,
    OCI_INDEX_FILE,
    LayoutError,
    NamedTarget,
    blob_digest,
    docker_layer_media_type,
    docker_manifest_bytes,
    gc_labels,
    is_metadata,
    media_type_of,
    merge_source,
    parse_children,
    parse_docker_manifest,
    parse_oci_index,
    record_names,
    source_label_key,
)
from services.pinner.airgap.stream import MemberEnd, MemberStart, TarStream

# Blobs up to this size are also kept in memory while they stream by: manifests and configs,
# which the tree walk reads again. Bounded in total so a strange archive cannot exhaust memory.
SMALL_BLOB_BYTES = 4 << 20
SMALL_CACHE_TOTAL = 64 << 20

log = get_logger(__name__)


class ArchiveImportError(PeermirrorError):
    """An archive could not be imported; nothing of it was kept."""


@dataclass(slots=True)
class _Member:
    digest: str
    size: int
    head: bytes


@dataclass(frozen=True, slots=True)
class _Node:
    """An index or manifest as the walk needs it: its GC labels, the children to walk on
    (present manifests of an index) and the leaves (config and layers of a manifest)."""

    gc: dict[str, str]
    walk: tuple[Descriptor, ...]
    leaves: tuple[Descriptor, ...]


def _unique(descs: Iterable[Descriptor]) -> list[Descriptor]:
    """Each digest once, first occurrence kept (an index may list a manifest many times)."""
    seen: set[str] = set()
    out: list[Descriptor] = []
    for desc in descs:
        if desc.digest not in seen:
            seen.add(desc.digest)
            out.append(desc)
    return out


@dataclass(slots=True)
class _Collected:
    """What one pass over the archive produced."""

    members: dict[str, _Member] = field(default_factory=dict)
    metadata: dict[str, bytes] = field(default_factory=dict)
    small: dict[str, bytes] = field(default_factory=dict)
    small_total: int = 0
    present: set[str] = field(default_factory=set)
    # Digests containerd was asked about and does not hold (asked once per import).
    absent: set[str] = field(default_factory=set)
    nodes: dict[str, _Node] = field(default_factory=dict)

    def cache(self, digest: str, data: bytes) -> None:
        if self.small_total + len(data) <= SMALL_CACHE_TOTAL and digest not in self.small:
            self.small[digest] = data
            self.small_total += len(data)


def _hash_in_reader(member: str) -> bool:
    # Only members whose digest the path does not promise need hashing (docker-save layers and
    # configs); OCI blobs are verified by containerd against the digest in their path.
    return blob_digest(member) is None and not is_metadata(member)


class ArchiveImporter:
    """Imports archives into the namespace of `client` through the lease-holding `ingest`."""

    def __init__(
        self,
        client: ContainerdClient,
        ingest: IngestChannel,
        *,
        max_descriptors: int = DEFAULT_MAX_DESCRIPTORS,
    ) -> None:
        self._client = client
        self._ingest = ingest
        self._max_descriptors = max_descriptors

    async def import_archive(
        self, path: Path, kind: FileKind, image_labels: Mapping[str, str]
    ) -> list[str]:
        """Import every image of the archive; returns the image record names created/updated."""
        budget = DescriptorBudget(self._max_descriptors)
        async with self._ingest.lease(str(path)) as lease:
            collected = _Collected()
            async with TarStream(path, kind, hash_member=_hash_in_reader) as stream:
                await self._consume(stream, lease, collected, budget)
            targets = await self._targets(lease, collected, budget)
            if not targets:
                raise ArchiveImportError(f"{path.name}: the archive names no image")
            labels = await self._plan_labels(lease, collected, targets, budget)
            for digest, wanted in labels.items():
                await self._client.update_content_labels(digest, wanted)
            return await self._create_records(targets, image_labels)

    # --- pass over the archive ----------------------------------------------------------------

    async def _consume(
        self, stream: TarStream, lease: Lease, out: _Collected, budget: DescriptorBudget
    ) -> None:
        start: MemberStart | None = None
        writer: BlobWriter | None = None
        expected: str | None = None
        buf = bytearray()
        keep = False
        head = b""
        try:
            async for item in stream:
                if isinstance(item, MemberStart):
                    await budget.spend()
                    start, buf, head = item, bytearray(), b""
                    if is_metadata(item.name):
                        if item.size > METADATA_MAX_BYTES:
                            raise LayoutError(f"{item.name} is implausibly large ({item.size})")
                        keep, writer, expected = True, None, None
                        continue
                    expected = blob_digest(item.name)
                    keep = item.size <= SMALL_BLOB_BYTES
                    writer = await lease.writer(item.size, expected)
                    if writer is None and expected is not None:
                        # Already in the store: hold it for this import and skip the bytes.
                        await lease.hold(expected)
                elif isinstance(item, bytes):
                    if not head:
                        head = item[:8]
                    if keep:
                        buf += item
                    if writer is not None:
                        await writer.write(item)
                else:
                    assert start is not None
                    self._finish_member(start, item, buf, head, expected, keep, out)
                    if writer is not None:
                        digest = expected or item.digest
                        assert digest is not None
                        if not await writer.commit(digest):
                            await lease.hold(digest)
                        writer = None
                    start = None
        finally:
            if writer is not None:
                await writer.abort()

    @staticmethod
    def _finish_member(
        start: MemberStart,
        end: MemberEnd,
        buf: bytearray,
        head: bytes,
        expected: str | None,
        keep: bool,
        out: _Collected,
    ) -> None:
        if is_metadata(start.name):
            out.metadata[start.name] = bytes(buf)
            return
        digest = expected or end.digest
        assert digest is not None
        out.members[start.name] = _Member(digest, start.size, head)
        out.present.add(digest)
        if keep:
            out.cache(digest, bytes(buf))

    # --- images the archive names -------------------------------------------------------------

    async def _targets(
        self, lease: Lease, collected: _Collected, budget: DescriptorBudget
    ) -> list[NamedTarget]:
        if OCI_INDEX_FILE in collected.metadata:
            named, unnamed = parse_oci_index(collected.metadata[OCI_INDEX_FILE])
            await budget.spend(len(named) + len(unnamed))
            if unnamed:
                log.warning(
                    "archive index entries without an image name are not imported",
                    digests=[d.digest for d in unnamed],
                )
            return named
        if DOCKER_MANIFEST_FILE in collected.metadata:
            return await self._docker_targets(lease, collected, budget)
        raise LayoutError("archive holds neither index.json (OCI) nor manifest.json (docker-save)")

    async def _docker_targets(
        self, lease: Lease, collected: _Collected, budget: DescriptorBudget
    ) -> list[NamedTarget]:
        targets: list[NamedTarget] = []
        for entry in parse_docker_manifest(collected.metadata[DOCKER_MANIFEST_FILE]):
            await budget.spend(1 + len(entry.layers) + len(entry.repo_tags))
            config = self._member(collected, entry.config)
            layers = []
            for layer_path in entry.layers:
                member = self._member(collected, layer_path)
                media = docker_layer_media_type(member.head)
                layers.append(Descriptor(member.digest, member.size, media))
            manifest = docker_manifest_bytes(
                Descriptor(config.digest, config.size, DOCKER_CONFIG), layers
            )
            digest = digest_of(manifest)
            writer = await lease.writer(len(manifest), digest)
            if writer is None:
                await lease.hold(digest)
            else:
                await writer.write(manifest)
                if not await writer.commit(digest):
                    await lease.hold(digest)
            collected.present.add(digest)
            collected.cache(digest, manifest)
            target = Descriptor(digest, len(manifest), DOCKER_MANIFEST)
            if not entry.repo_tags:
                log.warning("docker-save image without RepoTags is not imported", digest=digest)
            targets.extend(NamedTarget(name, target) for name in entry.repo_tags)
        return targets

    @staticmethod
    def _member(collected: _Collected, path: str) -> _Member:
        member = collected.members.get(path)
        if member is None:
            raise LayoutError(f"manifest.json names {path}, which the archive does not hold")
        return member

    # --- completeness check and labels --------------------------------------------------------

    async def _ensure_present(self, lease: Lease, collected: _Collected, digest: str) -> bool:
        if digest in collected.present:
            return True
        if digest in collected.absent:
            return False
        try:
            await self._client.content_info(digest)
        except ContainerdNotFoundError:
            collected.absent.add(digest)
            return False
        await lease.hold(digest)
        collected.present.add(digest)
        return True

    async def _read_small(self, collected: _Collected, desc: Descriptor) -> bytes:
        data = collected.small.get(desc.digest)
        if data is None:
            if desc.size > SMALL_BLOB_BYTES:
                raise LayoutError(f"manifest {desc.digest} is implausibly large ({desc.size})")
            pieces = [piece async for piece in self._client.read_content(desc.digest)]
            data = b"".join(pieces)
        if not digest_matches(desc.digest, data):
            raise LayoutError(f"content of {desc.digest} does not match its digest")
        return data

    async def _node(
        self,
        lease: Lease,
        collected: _Collected,
        desc: Descriptor,
        what: str,
        budget: DescriptorBudget,
    ) -> _Node:
        """What an index or manifest refers to, read, parsed and checked once per import."""
        node = collected.nodes.get(desc.digest)
        if node is not None:
            return node
        data = await self._read_small(collected, desc)
        media = media_type_of(desc.media_type, data)
        children = parse_children(media, data)
        # Every entry is paid for, repeated ones too: each gets a GC label.
        await budget.spend(len(children.all()))
        if is_index_media_type(media):
            listed = _unique(children.manifests)
            # Archives of one platform of a multi-platform image (`ctr export` without
            # --all-platforms) list manifests they do not hold; those are skipped.
            walk = [
                child
                for child in listed
                if await self._ensure_present(lease, collected, child.digest)
            ]
            if not walk:
                raise LayoutError(f"{what}: none of the index's manifests is present")
            node = _Node(gc_labels(children), tuple(walk), ())
        else:
            # Only indexes and manifests are walked: configs and layers are leaves.
            leaves = _unique(children.all())
            for child in leaves:
                if not await self._ensure_present(lease, collected, child.digest):
                    raise LayoutError(f"{what}: blob {child.digest} is missing")
            node = _Node(gc_labels(children), (), tuple(leaves))
        collected.nodes[desc.digest] = node
        return node

    async def _plan_labels(
        self,
        lease: Lease,
        collected: _Collected,
        targets: list[NamedTarget],
        budget: DescriptorBudget,
    ) -> dict[str, dict[str, str | None]]:
        """Walk every image, check each blob is present, and compute the labels to set.

        Each image's walk visits a descriptor once however often indexes list it, each index
        or manifest is read once per import, and every step is paid from `budget` (which also
        yields to the event loop): an archive built to make the walk explode is refused.
        """
        gc: dict[str, dict[str, str]] = {}
        sources: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        for named in targets:
            what = named.name.tagged
            registry, repository = named.name.registry, named.name.repository
            if not await self._ensure_present(lease, collected, named.target.digest):
                raise LayoutError(f"{what}: root {named.target.digest} is not in the archive")
            seen = {named.target.digest}
            stack: list[Descriptor] = [named.target]
            while stack:
                desc = stack.pop()
                await budget.spend()
                sources[desc.digest][registry].add(repository)
                node = await self._node(lease, collected, desc, what, budget)
                gc[desc.digest] = node.gc
                await budget.spend(len(node.walk) + len(node.leaves))
                for child in node.walk:
                    if child.digest not in seen:
                        seen.add(child.digest)
                        stack.append(child)
                for leaf in node.leaves:
                    sources[leaf.digest][registry].add(repository)
        plan: dict[str, dict[str, str | None]] = {}
        for digest, by_registry in sources.items():
            existing = dict((await self._client.content_info(digest)).labels)
            wanted: dict[str, str | None] = dict(gc.get(digest, {}))
            for registry, repos in by_registry.items():
                key = source_label_key(registry)
                wanted[key] = merge_source(existing.get(key), repos)
            plan[digest] = wanted
        return plan

    # --- image records ------------------------------------------------------------------------

    async def _create_records(
        self, targets: list[NamedTarget], image_labels: Mapping[str, str]
    ) -> list[str]:
        names: list[str] = []
        created: list[str] = []
        try:
            for named in targets:
                for name in record_names(named.name, named.target.digest):
                    if name in names:
                        continue
                    try:
                        await self._client.create_image(name, named.target, image_labels)
                        created.append(name)
                    except ContainerdAlreadyExistsError:
                        await self._client.update_image(
                            name, target=named.target, labels=dict(image_labels)
                        )
                    names.append(name)
        except BaseException:
            # Leave no half of an archive behind: drop the records this import created.
            for name in created:
                try:
                    await self._client.delete_image(name)
                except Exception as exc:  # best effort; the original error is what matters
                    log.warning("could not roll back image record", image=name, error=str(exc))
            raise
        return names
