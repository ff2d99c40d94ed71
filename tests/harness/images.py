"""The synthetic image builder for tests and benchmarks: re-exported from the product's one copy
(`services.common.oci.synthetic`, which the demo seeds nodes with)."""

from __future__ import annotations

from services.common.oci.document import ANNOTATION_CONTAINERD_NAME, ANNOTATION_REF_NAME
from services.common.oci.media_types import (
    DOCKER_CONFIG,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
)
from services.common.oci.synthetic import (
    DOCKER_LAYER_GZIP,
    OCI_LAYER_GZIP,
    BuiltImage,
    DockerArchive,
    Layer,
    MediaFlavour,
    Platform,
    PlatformImage,
    build_image,
    familiar_name,
    split_reference,
    write_docker_archive,
    write_oci_archive,
    write_oci_layout,
)

__all__ = [
    "ANNOTATION_CONTAINERD_NAME",
    "ANNOTATION_REF_NAME",
    "DOCKER_CONFIG",
    "DOCKER_LAYER_GZIP",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "OCI_CONFIG",
    "OCI_INDEX",
    "OCI_LAYER_GZIP",
    "OCI_MANIFEST",
    "BuiltImage",
    "DockerArchive",
    "Layer",
    "MediaFlavour",
    "Platform",
    "PlatformImage",
    "build_image",
    "familiar_name",
    "split_reference",
    "write_docker_archive",
    "write_oci_archive",
    "write_oci_layout",
]
