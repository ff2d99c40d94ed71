"""Parses the path below /v2/ into what is asked for, so handlers never split URLs themselves.

Repository names may contain slashes, so the route is a catch-all and the last two components
decide: ``<name>/manifests/<tag|digest>`` or ``<name>/blobs/<digest>``. Every failure is an
:class:`OciError` with a 4xx status:

- an invalid repository name: NAME_INVALID (400);
- a manifest reference that is neither a tag nor a supported digest: a malformed digest (it has a
  ``:``) is DIGEST_INVALID (400), a malformed tag MANIFEST_UNKNOWN (404), as the conformance
  suite expects for ``.INVALID_MANIFEST_NAME``;
- a blob reference that is not a supported digest: DIGEST_INVALID (400);
- any other path (tags/list, _catalog, uploads, ...): UNSUPPORTED answered with 404, since this
  registry has no such endpoint (methods other than GET and HEAD are refused earlier with 405).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from services.common.oci.errors import ErrorCode, OciError
from services.common.oci.grammar import parse_digest, validate_name, validate_tag

# Far above any valid path (255-character name + 128-character tag or 135-character digest);
# longer paths are refused before any parsing work is spent on them.
MAX_PATH_LENGTH = 1024


class Kind(enum.Enum):
    """Which endpoint a path names."""

    BASE = "base"
    MANIFEST = "manifest"
    BLOB = "blob"


@dataclass(frozen=True, slots=True)
class Route:
    """A parsed /v2/ path: for manifests and blobs, the repository and the tag or digest."""

    kind: Kind
    name: str = ""
    tag: str | None = None
    digest: str | None = None

    @property
    def reference(self) -> str:
        """The tag or digest as it appeared in the path ("" for the base endpoint)."""
        return self.digest if self.digest is not None else (self.tag or "")

    def to_path(self) -> str:
        """The path below /v2/ this route came from (inverse of :func:`parse_v2_path`)."""
        if self.kind is Kind.BASE:
            return ""
        segment = "manifests" if self.kind is Kind.MANIFEST else "blobs"
        return f"{self.name}/{segment}/{self.reference}"


BASE = Route(Kind.BASE)


def no_such_endpoint(path: str) -> OciError:
    """What a path naming no endpoint of this registry is answered with (404)."""
    return OciError(
        ErrorCode.UNSUPPORTED,
        "no such endpoint: this registry serves /v2/<name>/manifests/<reference> and "
        "/v2/<name>/blobs/<digest> only",
        detail={"path": path[:300]},
        status=404,
    )


def parse_v2_path(path: str) -> Route:
    """Parse the part of the URL path after ``/v2/`` (leading and trailing "/" tolerated once)."""
    if len(path) > MAX_PATH_LENGTH:
        raise no_such_endpoint(path)
    trimmed = path.removeprefix("/")
    if trimmed == "":
        return BASE
    parts = trimmed.rsplit("/", 2)
    if len(parts) != 3 or parts[1] not in ("manifests", "blobs") or not parts[2]:
        raise no_such_endpoint(path)
    name, segment, reference = parts
    validate_name(name)
    if segment == "blobs":
        return Route(Kind.BLOB, name, digest=str(parse_digest(reference)))
    if ":" in reference:
        return Route(Kind.MANIFEST, name, digest=str(parse_digest(reference)))
    return Route(Kind.MANIFEST, name, tag=validate_tag(reference))


def kind_hint(path: str) -> Kind | None:
    """The endpoint a path was aimed at even when it does not parse (for counting requests)."""
    parts = path.removeprefix("/").rsplit("/", 2)
    if len(parts) == 3 and parts[1] == "manifests":
        return Kind.MANIFEST
    if len(parts) == 3 and parts[1] == "blobs":
        return Kind.BLOB
    return None
