"""OCI and Docker media types, and telling a manifest from an index by reading its JSON.

containerd keeps no media type for content, only for the image record's target, so a manifest
reached by digest (a child of an index, or a peer's answer) has its type worked out from its
own ``mediaType`` field or, for OCI documents that omit it, from its shape.
"""

from __future__ import annotations

import json

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"

OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_TAR_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN_LAYER_TAR_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

OCTET_STREAM = "application/octet-stream"

INDEX_MEDIA_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
IMAGE_MANIFEST_MEDIA_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
# Everything served from /v2/<name>/manifests/<reference>.
MANIFEST_MEDIA_TYPES = INDEX_MEDIA_TYPES | IMAGE_MANIFEST_MEDIA_TYPES

# Order for an Accept header when we fetch manifests ourselves: indexes first so multi-arch
# images resolve to their index, as containerd asks.
ACCEPT_MANIFESTS = (OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST)


def _base(media_type: str) -> str:
    # Parameters (";charset=...") never change which document type it is.
    return media_type.split(";", 1)[0].strip().lower()


def is_manifest_media_type(media_type: str) -> bool:
    """Whether ``media_type`` is served from the manifests endpoint (image manifest or index)."""
    return _base(media_type) in MANIFEST_MEDIA_TYPES


def is_index_media_type(media_type: str) -> bool:
    """Whether ``media_type`` is a multi-platform index (OCI index or Docker manifest list)."""
    return _base(media_type) in INDEX_MEDIA_TYPES


def is_image_manifest_media_type(media_type: str) -> bool:
    """Whether ``media_type`` is a single-platform image manifest (OCI or Docker v2)."""
    return _base(media_type) in IMAGE_MANIFEST_MEDIA_TYPES


def declared_media_type(body: bytes) -> str | None:
    """The ``mediaType`` a JSON document declares at its top level (None: it declares none)."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    declared = doc.get("mediaType") if isinstance(doc, dict) else None
    return declared.strip() if isinstance(declared, str) else None


def detect_manifest_media_type(body: bytes) -> str | None:
    """The manifest media type of ``body``, or None when it is not a (schema 2) manifest/index.

    A ``mediaType`` field decides when present (None if it is not a manifest type). Without it
    the OCI shape decides: a ``manifests`` list means an OCI index, a ``config`` object with a
    ``layers`` list an OCI manifest (Docker types always carry ``mediaType``).
    """
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict):
        return None
    schema = doc.get("schemaVersion")
    if schema is not None and schema != 2:
        return None
    declared = doc.get("mediaType")
    if declared is not None:
        if isinstance(declared, str) and is_manifest_media_type(declared):
            return _base(declared)
        return None
    if isinstance(doc.get("manifests"), list):
        return OCI_INDEX
    if isinstance(doc.get("config"), dict) and isinstance(doc.get("layers"), list):
        return OCI_MANIFEST
    return None
