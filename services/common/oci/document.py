"""OCI documents: descriptors, the children of a manifest or index, index.json names, digests.

The one place that reads these shapes; the stores, the pinner's tracker and the air-gap import
all use it. Parsing here is lenient (a malformed child is skipped, an unreadable document has no
children); callers that must reject bad archives check `strict_descriptor` themselves.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

from services.common.oci.grammar import SUPPORTED_ALGORITHMS
from services.common.oci.media_types import (
    detect_manifest_media_type,
    is_image_manifest_media_type,
    is_index_media_type,
    is_manifest_media_type,
)
from services.common.store.protocol import Descriptor

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
    """The descriptor `obj` spells; ValueError naming `what` unless digest, size and media type
    are all well formed (for content that is about to be written)."""
    desc = descriptor(obj)
    if desc is None:
        raise ValueError(f"{what}: bad or unsupported digest")
    assert isinstance(obj, Mapping)
    size, media = obj.get("size"), obj.get("mediaType", "")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f"{what}: bad size {size!r}")
    if not isinstance(media, str):
        raise ValueError(f"{what}: bad mediaType {media!r}")
    return desc


def manifest_kind(body: bytes, media_type: str = "") -> str | None:
    """The manifest media type of `body`: the parent's `media_type` when it is one, else what the
    document says or its shape shows; None for anything that is not a manifest or index."""
    kind = media_type.split(";", 1)[0].strip().lower()
    if is_manifest_media_type(kind):
        return kind
    return detect_manifest_media_type(body)


def manifest_children(body: bytes, media_type: str = "") -> tuple[Descriptor, ...]:
    """The descriptors a manifest or index refers to; () for anything else or unparsable JSON.

    An index yields its `manifests`; an image manifest its `config` and `layers`. `media_type`
    is what the parent said; when empty or not a manifest type the document's own shape decides.
    """
    kind = manifest_kind(body, media_type)
    if kind is None:
        return ()
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return ()
    if not isinstance(doc, dict):
        return ()
    found: list[Descriptor | None] = []
    if is_index_media_type(kind):
        manifests = doc.get("manifests")
        if isinstance(manifests, list):
            found.extend(descriptor(m) for m in manifests)
    elif is_image_manifest_media_type(kind):
        found.append(descriptor(doc.get("config")))
        layers = doc.get("layers")
        if isinstance(layers, list):
            found.extend(descriptor(layer) for layer in layers)
    return tuple(d for d in found if d is not None)


def may_have_children(desc: Descriptor) -> bool:
    """Whether `desc` has to be read to find more digests (a manifest/index, or type unknown)."""
    return desc.media_type == "" or is_manifest_media_type(desc.media_type)


# --- index.json --------------------------------------------------------------------------------


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
