"""Pure logic of image archives: which members are blobs or metadata, what images they name,
the manifests containerd's importer would synthesise for docker-save tars, and the labels
content needs (garbage-collection references and distribution sources)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from services.common.oci.document import (
    INDEX_FILE,
    Children,
    DocumentError,
    annotations_of,
    entry_name,
    load_json,
    split_digest,
    strict_descriptor,
)
from services.common.oci.document import parse_children as read_children
from services.common.oci.grammar import GrammarError, parse_reference
from services.common.oci.media_types import (
    DOCKER_LAYER_TAR,
    DOCKER_LAYER_TAR_GZIP,
    DOCKER_MANIFEST,
    OCI_LAYER_TAR_ZSTD,
    detect_manifest_media_type,
)
from services.common.store.protocol import Descriptor

OCI_INDEX_FILE = INDEX_FILE
DOCKER_MANIFEST_FILE = "manifest.json"
# Archive members read into memory; anything else is content streamed to containerd.
METADATA_FILES = frozenset({OCI_INDEX_FILE, DOCKER_MANIFEST_FILE, "oci-layout", "repositories"})
METADATA_MAX_BYTES = 16 << 20

GC_REF_PREFIX = "containerd.io/gc.ref.content"
SOURCE_LABEL_PREFIX = "containerd.io/distribution.source."
# containerd refuses a label whose key and value together exceed 4096 bytes.
LABEL_MAX_BYTES = 4096

# containerd's importer takes sha256 content only.
IMPORT_ALGORITHM = "sha256"
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class LayoutError(DocumentError):
    """The archive's metadata is missing, malformed or names content it does not hold."""


def blob_digest(member: str) -> str | None:
    """The digest an OCI layout path `blobs/sha256/<hex>` promises, else None."""
    top, _, rest = member.partition("/")
    algorithm, _, encoded = rest.partition("/")
    digest = f"{algorithm}:{encoded}"
    # split_digest takes hex only, so no further path component can hide in `encoded`.
    if top != "blobs" or algorithm != IMPORT_ALGORITHM or split_digest(digest) is None:
        return None
    return digest


def is_metadata(member: str) -> bool:
    """Whether a member is archive metadata (kept in memory) rather than content."""
    return member in METADATA_FILES


# --- image names ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImageName:
    """A normalised image reference split the ways containerd records need it."""

    registry: str
    repository: str
    tag: str

    @property
    def tagged(self) -> str:
        return f"{self.registry}/{self.repository}:{self.tag}"

    def by_digest(self, digest: str) -> str:
        return f"{self.registry}/{self.repository}@{digest}"


def parse_image_name(text: str) -> ImageName:
    """Normalise `alpine`, `alpine:3`, `reg:5000/a/b:t` (a missing tag means `latest`)."""
    try:
        ref = parse_reference(text.strip())
    except GrammarError as exc:
        raise LayoutError(f"invalid image name {text!r}: {exc}") from exc
    return ImageName(ref.registry, ref.repository, ref.tag or "latest")


def record_names(name: ImageName, digest: str) -> list[str]:
    """The image records an import creates: the tag and the `name@digest` reference."""
    return [name.tagged, name.by_digest(digest)]


# --- OCI layout --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NamedTarget:
    """One image an archive names: its reference and root descriptor."""

    name: ImageName
    target: Descriptor


def _load_json(data: bytes, what: str) -> object:
    try:
        return load_json(data, what)
    except DocumentError as exc:
        raise LayoutError(str(exc)) from exc


def _descriptor(obj: object, what: str) -> Descriptor:
    try:
        desc = strict_descriptor(obj, what)
    except DocumentError as exc:
        raise LayoutError(str(exc)) from exc
    if not desc.digest.startswith(IMPORT_ALGORITHM + ":"):
        raise LayoutError(f"{what}: unsupported digest {desc.digest!r}")
    return desc


def parse_oci_index(data: bytes) -> tuple[list[NamedTarget], list[Descriptor]]:
    """Images named by an OCI layout's index.json, and the entries that carry no usable name.

    Names follow `document.entry_name` (a bare tag names nothing without a base name).
    """
    obj = _load_json(data, OCI_INDEX_FILE)
    if not isinstance(obj, Mapping) or not isinstance(obj.get("manifests"), list):
        raise LayoutError("index.json has no manifests list")
    named: list[NamedTarget] = []
    unnamed: list[Descriptor] = []
    for i, entry in enumerate(obj["manifests"]):
        desc = _descriptor(entry, f"index.json manifests[{i}]")
        text = entry_name(annotations_of(entry))
        if text:
            named.append(NamedTarget(parse_image_name(text), desc))
        else:
            unnamed.append(desc)
    return named, unnamed


def media_type_of(desc_media: str, data: bytes) -> str:
    """A manifest's media type: the descriptor's, else the JSON's `mediaType`, else its shape."""
    if desc_media:
        return desc_media
    _load_json(data, "manifest")
    detected = detect_manifest_media_type(data)
    if detected is None:
        raise LayoutError("cannot tell the media type of a manifest")
    return detected


def parse_children(media_type: str, data: bytes) -> Children:
    """The descriptors an index (manifests) or image manifest (config, layers) refers to, each
    checked (LayoutError names what is wrong)."""
    try:
        children = read_children(data, media_type, strict=True)
    except DocumentError as exc:
        raise LayoutError(str(exc)) from exc
    for i, desc in enumerate(children.all()):
        if not desc.digest.startswith(IMPORT_ALGORITHM + ":"):
            raise LayoutError(f"child {i}: unsupported digest {desc.digest!r}")
    return children


def gc_labels(children: Children) -> dict[str, str]:
    """Labels that make containerd's garbage collector keep a manifest's children alive."""
    labels: dict[str, str] = {}
    for i, desc in enumerate(children.manifests):
        labels[f"{GC_REF_PREFIX}.m.{i}"] = desc.digest
    if children.config is not None:
        labels[f"{GC_REF_PREFIX}.config"] = children.config.digest
    for i, desc in enumerate(children.layers):
        labels[f"{GC_REF_PREFIX}.l.{i}"] = desc.digest
    return labels


def source_label_key(registry: str) -> str:
    return SOURCE_LABEL_PREFIX + registry


def merge_source(existing: str | None, repositories: Iterable[str]) -> str:
    """The value of a distribution-source label after adding `repositories` (comma list, sorted).

    containerd keeps every repository a blob was fetched from; we do the same, and drop the
    longest names first if the list would overflow containerd's label size limit.
    """
    names = {r for r in (existing or "").split(",") if r}
    names.update(repositories)
    ordered = sorted(names)
    while ordered and len(",".join(ordered)) > LABEL_MAX_BYTES - 128:
        ordered.remove(max(ordered, key=len))
    return ",".join(ordered)


# --- docker-save -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DockerEntry:
    """One image of a docker-save manifest.json: member paths of config and layers, and tags."""

    config: str
    layers: tuple[str, ...]
    repo_tags: tuple[ImageName, ...]


def parse_docker_manifest(data: bytes) -> list[DockerEntry]:
    """The images of a docker-save `manifest.json`."""
    obj = _load_json(data, DOCKER_MANIFEST_FILE)
    if not isinstance(obj, list):
        raise LayoutError("manifest.json is not a list")
    out: list[DockerEntry] = []
    for i, entry in enumerate(obj):
        if not isinstance(entry, Mapping):
            raise LayoutError(f"manifest.json[{i}] is not an object")
        config, layers, tags = entry.get("Config"), entry.get("Layers"), entry.get("RepoTags")
        if not isinstance(config, str) or not isinstance(layers, list):
            raise LayoutError(f"manifest.json[{i}] lacks Config or Layers")
        if not all(isinstance(layer, str) for layer in layers):
            raise LayoutError(f"manifest.json[{i}] has a non-string layer path")
        names = tuple(parse_image_name(t) for t in (tags or []) if isinstance(t, str))
        out.append(
            DockerEntry(
                config=_clean(config),
                layers=tuple(_clean(layer) for layer in layers),
                repo_tags=names,
            )
        )
    return out


def _clean(path: str) -> str:
    while path.startswith("./"):
        path = path[2:]
    return path.lstrip("/")


def docker_layer_media_type(head: bytes) -> str:
    """Media type of a docker-save layer from its first bytes (compressed layers exist too)."""
    if head.startswith(_GZIP_MAGIC):
        return DOCKER_LAYER_TAR_GZIP
    if head.startswith(_ZSTD_MAGIC):
        return OCI_LAYER_TAR_ZSTD
    return DOCKER_LAYER_TAR


def docker_manifest_bytes(config: Descriptor, layers: Iterable[Descriptor]) -> bytes:
    """The Docker schema 2 manifest for a docker-save image (what containerd's importer writes)."""
    obj = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": _desc_obj(config),
        "layers": [_desc_obj(layer) for layer in layers],
    }
    return json.dumps(obj, indent=2).encode()


def _desc_obj(desc: Descriptor) -> dict[str, object]:
    return {"mediaType": desc.media_type, "size": desc.size, "digest": desc.digest}
