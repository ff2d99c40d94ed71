"""OCI documents: descriptors, the children of a manifest or index, index.json names, digests.

The one place that reads these shapes; the stores, the pinner's tracker and the air-gap import
all use it. Parsing is lenient by default (a malformed child is skipped, an unreadable document
has no children); importers ask for strict parsing, which names what is wrong.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from services.common.errors import InvalidArgumentError
from services.common.oci.grammar import SUPPORTED_ALGORITHMS
from services.common.oci.media_types import (
    detect_manifest_media_type,
    is_image_manifest_media_type,
    is_index_media_type,
    is_manifest_media_type,
)
from services.common.store.protocol import Descriptor


class DocumentError(InvalidArgumentError):
    """A document that has to be well formed is not; the message names the part."""


ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
INDEX_FILE = "index.json"
# A manifest or index larger than this is not one (containerd itself caps manifests at 4 MiB).
MAX_MANIFEST_BYTES = 4 << 20


# --- digests -----------------------------------------------------------------------------------


def split_digest(digest: str) -> tuple[str, str] | None:
    """(algorithm, hex) of a well-formed sha256/sha512 digest, else None.

    Only digests of this exact shape become file paths, so no input can point outside a store.
    """
    algorithm, sep, encoded = digest.partition(":")
    rule = SUPPORTED_ALGORITHMS.get(algorithm)
    if not sep or rule is None or rule.fullmatch(encoded) is None:
        return None
    return algorithm, encoded


def blob_path(root: Path, digest: str) -> Path | None:
    """Where an OCI layout or containerd content root keeps `digest`; None when malformed."""
    parts = split_digest(digest)
    return None if parts is None else root / "blobs" / parts[0] / parts[1]


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    """The digest of `data` (`sha256` or `sha512`)."""
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def digest_matches(digest: str, data: bytes) -> bool:
    """Whether `data` hashes to `digest` (False for malformed or unsupported digests)."""
    parts = split_digest(digest)
    return parts is not None and hashlib.new(parts[0], data).hexdigest() == parts[1]


# --- descriptors and children ------------------------------------------------------------------


def descriptor(obj: object) -> Descriptor | None:
    """The descriptor `obj` spells (a JSON object with a supported digest), else None.

    A missing or bad size reads as 0 and a missing media type as "" (both only ever hints).
    """
    if not isinstance(obj, Mapping):
        return None
    digest = obj.get("digest")
    if not isinstance(digest, str) or split_digest(digest) is None:
        return None
    size = obj.get("size")
    media_type = obj.get("mediaType")
    return Descriptor(
        digest=digest,
        size=size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else 0,
        media_type=media_type if isinstance(media_type, str) else "",
    )


def strict_descriptor(obj: object, what: str) -> Descriptor:
    """The descriptor `obj` spells; DocumentError naming `what` unless digest, size and media
    type are all well formed (for content that is about to be written)."""
    if not isinstance(obj, Mapping):
        raise DocumentError(f"{what}: descriptor is not an object")
    desc = descriptor(obj)
    if desc is None:
        raise DocumentError(f"{what}: bad or unsupported digest {obj.get('digest')!r}")
    size, media = obj.get("size"), obj.get("mediaType", "")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise DocumentError(f"{what}: bad size {size!r}")
    if not isinstance(media, str):
        raise DocumentError(f"{what}: bad mediaType {media!r}")
    return desc


def load_json(body: bytes, what: str) -> object:
    """`body` parsed as JSON; DocumentError naming `what` when it is not."""
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise DocumentError(f"{what} is not valid JSON: {exc}") from exc


def manifest_kind(body: bytes, media_type: str = "") -> str | None:
    """The manifest media type of `body`: the parent's `media_type` when it is one, else what the
    document says or its shape shows; None for anything that is not a manifest or index."""
    kind = media_type.split(";", 1)[0].strip().lower()
    if is_manifest_media_type(kind):
        return kind
    return detect_manifest_media_type(body)


@dataclass(frozen=True, slots=True)
class Children:
    """What an index or manifest refers to, by role (containerd's GC labels name each role)."""

    manifests: tuple[Descriptor, ...] = ()
    config: Descriptor | None = None
    layers: tuple[Descriptor, ...] = ()

    def all(self) -> list[Descriptor]:
        """Every child: manifests, then config, then layers."""
        out = list(self.manifests)
        if self.config is not None:
            out.append(self.config)
        out.extend(self.layers)
        return out


def parse_children(body: bytes, media_type: str = "", *, strict: bool = False) -> Children:
    """The descriptors an index (manifests) or image manifest (config, layers) refers to.

    Lenient (the default): the document's own shape decides when `media_type` is not a manifest
    type, malformed children are skipped and anything else has no children. `strict` (content
    about to be imported): `media_type` must be a manifest type and every part well formed, else
    DocumentError says which.
    """
    kind = (
        media_type.split(";", 1)[0].strip().lower() if strict else manifest_kind(body, media_type)
    )
    if kind is None:
        return Children()
    try:
        doc = load_json(body, media_type or "manifest")
    except DocumentError:
        if strict:
            raise
        return Children()
    if not isinstance(doc, dict):
        if strict:
            raise DocumentError(f"{media_type} is not a JSON object")
        return Children()

    def read(obj: object, what: str) -> Descriptor | None:
        return strict_descriptor(obj, what) if strict else descriptor(obj)

    def read_list(key: str, missing: str) -> tuple[Descriptor, ...]:
        entries = doc.get(key)
        if not isinstance(entries, list):
            if strict:
                raise DocumentError(missing)
            return ()
        found = (read(e, f"{key}[{i}]") for i, e in enumerate(entries))
        return tuple(d for d in found if d is not None)

    if is_index_media_type(kind):
        return Children(manifests=read_list("manifests", "index has no manifests list"))
    if is_image_manifest_media_type(kind):
        layers = read_list("layers", "manifest has no layers list")
        return Children(config=read(doc.get("config"), "config"), layers=layers)
    if strict:
        raise DocumentError(f"unsupported manifest media type {media_type!r}")
    return Children()


def manifest_children(body: bytes, media_type: str = "") -> tuple[Descriptor, ...]:
    """Every descriptor a manifest or index refers to (lenient `parse_children`)."""
    return tuple(parse_children(body, media_type).all())


def may_have_children(desc: Descriptor) -> bool:
    """Whether `desc` has to be read to find more digests (a manifest/index, or type unknown)."""
    return desc.media_type == "" or is_manifest_media_type(desc.media_type)


def reachable(
    targets: Iterable[Descriptor],
    children: Callable[[Descriptor], Iterable[Descriptor] | None],
    present: Container[str],
    *,
    max_depth: int | None = None,
) -> frozenset[str]:
    """Every digest in `present` reachable from `targets` (images' indexes or manifests).

    `children(desc)` gives a present manifest's children (None when it could not be read); it
    is only asked about present descriptors for which `may_have_children` holds. An absent
    manifest hides its children. `max_depth` bounds the nesting a walk follows; None follows
    every level, as a prune must (stopping short would call a deep blob unused).
    """
    found: set[str] = set()
    stack: list[tuple[Descriptor, int]] = [(target, 0) for target in targets]
    while stack:
        desc, depth = stack.pop()
        if desc.digest in found or desc.digest not in present:
            continue
        found.add(desc.digest)
        if (max_depth is not None and depth >= max_depth) or not may_have_children(desc):
            continue
        stack.extend((child, depth + 1) for child in children(desc) or ())
    return frozenset(found)


# --- index.json --------------------------------------------------------------------------------


def parse_index(data: bytes) -> list[dict[str, object]]:
    """The `manifests` entries of an index.json document; DocumentError when it is not one."""
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise DocumentError(f"index.json is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise DocumentError("index.json is not a JSON object")
    manifests = doc.get("manifests", [])
    if not isinstance(manifests, list):
        raise DocumentError("index.json `manifests` is not a list")
    return [m for m in manifests if isinstance(m, dict)]


def annotations_of(entry: object) -> dict[str, str]:
    """The string annotations of an index.json entry ({} when it has none)."""
    raw = entry.get("annotations") if isinstance(entry, Mapping) else None
    if not isinstance(raw, Mapping):
        return {}
    return {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, str)}


def entry_name(
    annotations: Mapping[str, str], bare_tag_repository: str | None = None
) -> str | None:
    """The image name of an index.json entry, or None when it names no image.

    In this order: `io.containerd.image.name` (containerd's export and our writers set the full
    reference); `org.opencontainers.image.ref.name` when it holds a reference (a `/` or a `:`,
    which no tag contains); a bare tag there, as skopeo writes it, becomes
    `<bare_tag_repository>:<tag>` when a repository is given.
    """
    name = annotations.get(ANNOTATION_CONTAINERD_NAME, "")
    if name:
        return name
    ref = annotations.get(ANNOTATION_REF_NAME, "")
    if not ref:
        return None
    if "/" in ref or ":" in ref:
        return ref
    if bare_tag_repository:
        return f"{bare_tag_repository}:{ref}"
    return None
