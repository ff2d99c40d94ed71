"""Which keys this node advertises, worked out from its images (pure: no store, no network).

An image's present digests come from walking its graph (`image_graph`). For an image of a
mirrored registry the keys are those present digests plus, for a tag reference that the shared
serving policy allows (latest rule, filters), the tag reference `<registry>/<name>:<tag>`.
`name@digest` references contribute digests only; names that are not fully qualified references
(CRI's `sha256:<id>` records) contribute nothing.

`KeyIndex` counts, per key, the images holding it, so a digest shared by two images stays
advertised while either remains; every change returns the exact keys gained and lost.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from services.common.k3s.mirror_policy import Policy
from services.common.oci.errors import OciError
from services.common.oci.grammar import (
    is_digest_syntax,
    looks_like_registry,
    parse_reference,
)

# --- which keys an image gives -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImageKeys:
    """What one image name contributes: whether its digests count, and its tag key if any."""

    digests: bool
    tag_key: str | None = None


NO_KEYS = ImageKeys(digests=False)


class KeyPolicy:
    """Decides per image name which keys it may give, with the registry's serving rules.

    The same `Policy` the registry serves with (mirrored registries, latest rule, filters), so
    the node advertises exactly what its registry would answer for.
    """

    def __init__(self, policy: Policy, *, mirrors_anything: bool = True) -> None:
        self._policy = policy
        self.mirrors_anything = mirrors_anything
        self._cache: dict[str, ImageKeys] = {}

    def update(self, *, mirrors_anything: bool) -> None:
        """The mirrored registries changed (registries.yaml was edited): decide afresh."""
        self.mirrors_anything = mirrors_anything
        self._cache.clear()

    def image_keys(self, name: str) -> ImageKeys:
        """The keys image record `name` may contribute (cached until the rules change)."""
        cached = self._cache.get(name)
        if cached is None:
            cached = self._decide(name)
            if len(self._cache) > 65536:
                self._cache.clear()
            self._cache[name] = cached
        return cached

    def _decide(self, name: str) -> ImageKeys:
        if not self.mirrors_anything:
            return NO_KEYS
        first, slash, _rest = name.partition("/")
        # containerd's records are fully qualified; anything else (CRI's `sha256:<id>` names,
        # hand-made short names) has no registry to be mirrored for.
        if not slash or not looks_like_registry(first) or is_digest_syntax(name):
            return NO_KEYS
        try:
            ref = parse_reference(name)
            self._policy.check(ref.registry, ref.repository)
        except OciError:
            return NO_KEYS
        if ref.tag is None or ref.digest is not None:
            return ImageKeys(digests=True)
        try:
            target = self._policy.check(ref.registry, ref.repository, ref.tag)
        except OciError:
            return ImageKeys(digests=True)
        return ImageKeys(digests=True, tag_key=target.store_key(ref.tag))


def image_key_set(name: str, digests: Iterable[str], policy: KeyPolicy) -> frozenset[str]:
    """The keys image `name` holding the present `digests` gives (empty when not mirrored)."""
    decision = policy.image_keys(name)
    if not decision.digests:
        return frozenset()
    keys = set(digests)
    if decision.tag_key is not None and keys:
        keys.add(decision.tag_key)
    return frozenset(keys)


# --- the node's key set ------------------------------------------------------------------------


@dataclass(slots=True)
class KeyDelta:
    """Keys the node gained (to advertise) and lost (to withdraw) in one change."""

    added: set[str] = field(default_factory=set)
    removed: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)

    def merge(self, other: KeyDelta) -> None:
        """Fold a later change into this one (a key added then removed cancels out)."""
        for key in other.added:
            if key in self.removed:
                self.removed.discard(key)
            else:
                self.added.add(key)
        for key in other.removed:
            if key in self.added:
                self.added.discard(key)
            else:
                self.removed.add(key)


def diff(desired: Collection[str], advertised: Collection[str]) -> KeyDelta:
    """What to advertise and withdraw so that `advertised` becomes `desired`."""
    want = set(desired)
    have = set(advertised)
    return KeyDelta(added=want - have, removed=have - want)


class KeyIndex:
    """Per image name, the keys it holds; per key, how many images hold it."""

    def __init__(self) -> None:
        self._images: dict[str, frozenset[str]] = {}
        self._holders: dict[str, int] = {}
        self._key_images: dict[str, set[str]] = {}

    @property
    def keys(self) -> frozenset[str]:
        """Every key held by at least one image."""
        return frozenset(self._holders)

    @property
    def images(self) -> Mapping[str, frozenset[str]]:
        return self._images

    def image(self, name: str) -> frozenset[str]:
        """Keys held by image `name` (empty when unknown)."""
        return self._images.get(name, frozenset())

    def holders_of(self, key: str) -> set[str]:
        """Names of the images holding `key`."""
        return set(self._key_images.get(key, ()))

    def set_image(self, name: str, keys: Iterable[str]) -> KeyDelta:
        """Make image `name` hold exactly `keys` (empty: forget the image)."""
        new = frozenset(keys)
        old = self._images.get(name, frozenset())
        if new == old:
            return KeyDelta()
        delta = KeyDelta()
        for key in new - old:
            count = self._holders.get(key, 0)
            if count == 0:
                delta.added.add(key)
            self._holders[key] = count + 1
            self._key_images.setdefault(key, set()).add(name)
        for key in old - new:
            count = self._holders[key] - 1
            holders = self._key_images[key]
            holders.discard(name)
            if count == 0:
                del self._holders[key]
                del self._key_images[key]
                delta.removed.add(key)
            else:
                self._holders[key] = count
        if new:
            self._images[name] = new
        else:
            self._images.pop(name, None)
        return delta

    def remove_image(self, name: str) -> KeyDelta:
        """Forget image `name`; keys still held by other images stay."""
        return self.set_image(name, ())

    def replace_all(self, images: Mapping[str, Iterable[str]]) -> KeyDelta:
        """Make the index hold exactly `images` (a full resync), returning the net change."""
        delta = KeyDelta()
        for name in [n for n in self._images if n not in images]:
            delta.merge(self.remove_image(name))
        for name, keys in images.items():
            delta.merge(self.set_image(name, keys))
        return delta
