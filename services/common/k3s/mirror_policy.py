"""Which requests this node serves at all: upstream registry, mirrored registries, latest, filters.

Rules, checked in this order for every manifest and blob request (local and peer alike):

0. On a node whose K3s ``embedded-registry`` switch is off (``taking_part=False``) every request
   is refused (404 NAME_UNKNOWN): the node takes no part, and containerd moves straight on to its
   next endpoint.
1. The upstream registry is the ``ns`` query parameter (normalised: ``index.docker.io`` is
   ``docker.io``); without ``ns`` it is ``registry.default_registry``; with neither the request is
   refused (404 NAME_UNKNOWN), because a store key cannot be formed. A malformed ``ns`` is
   NAME_INVALID (400).
2. The registry must be mirrored on this node (``mirrors`` of registries.yaml, ``"*"`` = all);
   otherwise 404 NAME_UNKNOWN, as a K3s node takes no part for other registries.
3. Tag requests only: the tag ``latest`` is refused (404 MANIFEST_UNKNOWN) unless
   ``allow_latest``, since it moves too often for a peer's copy to be trusted.
4. Tag requests only: when ``filters`` are configured, ``<registry>/<name>:<tag>`` must match at
   least one of them (``re.search``), else 404 MANIFEST_UNKNOWN. Filters gate tag resolution, the
   one trust-sensitive operation (a tag is a mutable pointer a node could poison); digest
   requests are self-verifying and, like the keys peers advertise, not scoped by repository, so
   filters do not apply to them (containerd asks for digests it learned through a filtered tag).

Docker Hub names with one component get ``library/`` (``alpine`` -> ``library/alpine``), which is
how containerd spells them already and how stores name them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from services.common.oci.errors import ErrorCode, OciError
from services.common.oci.grammar import (
    normalize_name,
    normalize_registry,
    store_key,
    validate_name,
    validate_registry,
)

LATEST = "latest"


@dataclass(frozen=True, slots=True)
class Target:
    """Where a permitted request points: upstream registry and normalised repository name."""

    registry: str
    name: str

    def store_key(self, tag: str) -> str:
        """The image name stores use for `tag`: ``<registry>/<name>:<tag>``."""
        return store_key(self.registry, self.name, tag)


def compile_filters(patterns: Iterable[str]) -> tuple[re.Pattern[str], ...]:
    """Compile configured filters; ValueError names the first invalid one."""
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise ValueError(f"registry.filters: invalid regex {pattern!r}: {exc}") from None
    return tuple(compiled)


class Policy:
    """The serving rules of the module docstring; `is_mirrored(registry)` comes from the caller."""

    def __init__(
        self,
        is_mirrored: Callable[[str], bool],
        *,
        default_registry: str | None = None,
        allow_latest: bool = False,
        filters: Iterable[str] = (),
        taking_part: bool = True,
    ) -> None:
        self._is_mirrored = is_mirrored
        self.taking_part = taking_part
        self.default_registry = (
            normalize_registry(validate_registry(default_registry)) if default_registry else None
        )
        self.allow_latest = allow_latest
        self.filters = compile_filters(filters)

    def registry_for(self, ns: str | None) -> str:
        """The upstream registry a request is about (rule 1)."""
        if ns:
            return normalize_registry(validate_registry(ns))
        if self.default_registry is None:
            raise OciError(
                ErrorCode.NAME_UNKNOWN,
                "request has no ns parameter naming the upstream registry and no "
                "registry.default_registry is configured",
            )
        return self.default_registry

    def check(self, ns: str | None, name: str, tag: str | None = None) -> Target:
        """Apply rules 0-4 to a request for `name` (and `tag` when it is a tag request)."""
        if not self.taking_part:
            raise OciError(
                ErrorCode.NAME_UNKNOWN,
                "this node takes no part in the registry mirror (K3s embedded-registry is false)",
            )
        registry = self.registry_for(ns)
        if not self._is_mirrored(registry):
            raise OciError(
                ErrorCode.NAME_UNKNOWN,
                f"registry {registry} is not mirrored on this node",
                detail={"registry": registry},
            )
        target = Target(registry, validate_name(normalize_name(registry, name), registry))
        if tag is None:
            return target
        if tag == LATEST and not self.allow_latest:
            raise OciError(
                ErrorCode.MANIFEST_UNKNOWN,
                "the tag 'latest' is not served (registry.allow_latest is off)",
                detail={"reference": target.store_key(tag)},
            )
        if self.filters:
            subject = target.store_key(tag)
            if not any(f.search(subject) for f in self.filters):
                raise OciError(
                    ErrorCode.MANIFEST_UNKNOWN,
                    f"{subject} matches none of registry.filters",
                    detail={"reference": subject},
                )
        return target
