"""Pinning images in containerd: the labels, manual pin/unpin, and dropping our own pins.

`io.cri-containerd.pinned=pinned` is what containerd's CRI and kubelet's image garbage
collection honour. Pins the air-gap import sets also carry `io.cattle.k3s.pinned=pinned`, the
marker K3s itself uses for "pinned by the agent": reusing it (rather than a label of our own)
means a node that moves from K3s's importer to peermirror has its old K3s pins cleaned up by
the same rule at the next start, and the two never disagree on which pins are managed.
Manual pins carry only the CRI label, so restarts leave them alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.common.containerd.client import ContainerdClient
from services.common.containerd.errors import ContainerdNotFoundError
from services.common.containerd.models import Image
from services.common.errors import InvalidArgumentError
from services.common.oci.grammar import GrammarError, parse_reference

PIN_LABEL = "io.cri-containerd.pinned"
PIN_VALUE = "pinned"
MANAGED_LABEL = "io.cattle.k3s.pinned"
# Which images-directory file an imported image came from (shown by `peermirror pins`).
SOURCE_LABEL = "io.peermirror.import.source"
# containerd refuses labels longer than this (key and value together).
_LABEL_MAX = 4096


def _filter_label(key: str, value: str) -> str:
    # Label keys contain dots, so containerd's filter syntax needs them quoted.
    return f'labels."{key}"=={value}'


def managed_labels(source: str) -> dict[str, str]:
    """Labels of an image the air-gap import pinned, `source` being the file it came from."""
    labels = {PIN_LABEL: PIN_VALUE, MANAGED_LABEL: PIN_VALUE}
    if len(SOURCE_LABEL) + len(source) < _LABEL_MAX:
        labels[SOURCE_LABEL] = source
    return labels


@dataclass(frozen=True, slots=True)
class Pin:
    """A pinned image as the API reports it."""

    name: str
    digest: str
    media_type: str
    managed: bool
    source: str


def is_pinned(labels: Mapping[str, str]) -> bool:
    return labels.get(PIN_LABEL) == PIN_VALUE


def pin_of(image: Image) -> Pin:
    managed = image.labels.get(MANAGED_LABEL) == PIN_VALUE
    return Pin(
        name=image.name,
        digest=image.target.digest,
        media_type=image.target.media_type,
        managed=managed,
        source=image.labels.get(SOURCE_LABEL, "") if managed else "",
    )


class InvalidReferenceError(InvalidArgumentError):
    """A pin/unpin reference is neither an image name in containerd nor a valid reference."""


def candidate_names(ref: str) -> list[str]:
    """Names to try for `ref`: as given, then normalised as containerd does (docker.io/library)."""
    ref = ref.strip()
    if not ref:
        raise InvalidReferenceError("empty image reference")
    names = [ref]
    if ref.startswith("sha256:"):
        # CRI's image-id records are named by config digest; they are not references.
        return names
    try:
        parsed = parse_reference(ref)
    except GrammarError as exc:
        raise InvalidReferenceError(f"invalid image reference {ref!r}: {exc}") from exc
    if parsed.tag is None and parsed.digest is None:
        parsed = parse_reference(ref + ":latest")
    normal = str(parsed)
    if normal != ref:
        names.append(normal)
    return names


class PinManager:
    """Pin, unpin and list pins of the images in `client`'s namespace."""

    def __init__(self, client: ContainerdClient) -> None:
        self.client = client

    async def resolve(self, ref: str) -> Image:
        """The image record `ref` names; ContainerdNotFoundError when there is none."""
        names = candidate_names(ref)
        for name in names:
            try:
                return await self.client.get_image(name)
            except ContainerdNotFoundError:
                continue
        raise ContainerdNotFoundError(names[-1], "no such image")

    async def pinned(self) -> list[Pin]:
        """Every pinned image, sorted by name."""
        images = await self.client.list_images(_filter_label(PIN_LABEL, PIN_VALUE))
        return sorted((pin_of(img) for img in images), key=lambda p: p.name)

    async def pin(self, ref: str) -> Pin:
        """Pin an existing image by hand (not managed: restarts leave it pinned)."""
        image = await self.resolve(ref)
        if is_pinned(image.labels):
            return pin_of(image)
        return pin_of(await self.client.update_image(image.name, labels={PIN_LABEL: PIN_VALUE}))

    async def unpin(self, ref: str) -> bool:
        """Remove the pin (and our marker); returns whether the image was pinned."""
        image = await self.resolve(ref)
        was_pinned = is_pinned(image.labels)
        present = [k for k in (PIN_LABEL, MANAGED_LABEL, SOURCE_LABEL) if k in image.labels]
        if present:
            await self.client.update_image(image.name, labels=dict.fromkeys(present))
        return was_pinned

    async def unpin_managed(self) -> list[str]:
        """Remove every pin the air-gap import set earlier; returns the image names unpinned."""
        images = await self.client.list_images(_filter_label(MANAGED_LABEL, PIN_VALUE))
        for image in images:
            await self.client.update_image(
                image.name, labels=dict.fromkeys((PIN_LABEL, MANAGED_LABEL, SOURCE_LABEL))
            )
        return sorted(img.name for img in images)

    async def pin_managed(self, names: list[str], source: str) -> None:
        """Mark images (e.g. ones CRI pulled for a list file) as pinned by the import."""
        for name in names:
            await self.client.update_image(name, labels=dict(managed_labels(source)))
