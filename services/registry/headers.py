"""Response headers of manifest and blob answers, computed in one place for GET and HEAD alike."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.oci.errors import ErrorCode, OciError
from services.common.oci.media_types import OCTET_STREAM
from services.registry.ranges import ByteRange, Unsatisfiable, parse_range

# Marks a request sent by a peer's registry: such requests are served from local content only,
# so a relay never turns into a second hop (or a loop).
PEER_HEADER = "X-Peermirror-Peer"
PEER_HEADER_VALUE = "1"

DIGEST_HEADER = "Docker-Content-Digest"
NAMESPACE_HEADER = "OCI-Namespace"
API_VERSION_HEADER = "Docker-Distribution-API-Version"
API_VERSION = "registry/2.0"


def is_peer_request(value: str | None) -> bool:
    """Whether the value of PEER_HEADER marks a peer request."""
    return value is not None and value.strip() == PEER_HEADER_VALUE


def manifest_headers(digest: str, size: int, media_type: str, registry: str) -> dict[str, str]:
    """200 manifest answer: exact type, length and digest, plus the registry it was served for."""
    return {
        "Content-Type": media_type,
        "Content-Length": str(size),
        DIGEST_HEADER: digest,
        NAMESPACE_HEADER: registry,
    }


def blob_headers(
    digest: str, size: int, registry: str, byte_range: ByteRange | None = None
) -> dict[str, str]:
    """200 (whole blob) or 206 (`byte_range`) blob answer; the digest is always the whole blob's."""
    headers = {
        "Content-Type": OCTET_STREAM,
        "Content-Length": str(size if byte_range is None else byte_range.length),
        DIGEST_HEADER: digest,
        NAMESPACE_HEADER: registry,
        "Accept-Ranges": "bytes",
    }
    if byte_range is not None:
        headers["Content-Range"] = byte_range.content_range()
    return headers


def unsatisfiable_headers(unsatisfiable: Unsatisfiable, registry: str) -> dict[str, str]:
    """Extra headers of a 416 answer: the blob's size, so a client can ask again correctly."""
    return {
        "Content-Range": unsatisfiable.content_range(),
        "Accept-Ranges": "bytes",
        NAMESPACE_HEADER: registry,
    }


class OciErrorWithHeaders(OciError):
    """An OCI error whose answer carries extra headers (a 405's ``Allow``, a 416's size)."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        headers: dict[str, str],
        detail: object = None,
        status: int | None = None,
    ) -> None:
        super().__init__(code, message, detail=detail, status=status)
        self.headers = headers


class RangeNotSatisfiableError(OciErrorWithHeaders):
    """A client's Range selects nothing of the blob: answered 416 with the blob's size."""


def select_range(header: str | None, size: int, registry: str) -> ByteRange | None:
    """The part of a `size`-byte blob a client's Range header asks for (None: all of it), for
    local and relayed blobs alike. Raises RangeNotSatisfiableError."""
    selected = parse_range(header, size)
    if isinstance(selected, Unsatisfiable):
        raise RangeNotSatisfiableError(
            ErrorCode.RANGE_INVALID,
            f"range {header!r} selects nothing of a {size}-byte blob",
            headers=unsatisfiable_headers(selected, registry),
        )
    return selected


@dataclass(frozen=True, slots=True)
class BlobAnswer:
    """How a GET or HEAD of a blob is answered: status, headers, and the bytes of the blob
    (`count` from `offset`) its body holds."""

    status: int
    headers: dict[str, str]
    offset: int
    count: int


def blob_answer(range_header: str | None, digest: str, size: int, registry: str) -> BlobAnswer:
    """The answer to a request for the `size`-byte blob `digest` carrying `range_header`: all of
    it (200) or the part asked for (206). Raises RangeNotSatisfiableError."""
    byte_range = select_range(range_header, size, registry)
    headers = blob_headers(digest, size, registry, byte_range)
    if byte_range is None:
        return BlobAnswer(200, headers, 0, size)
    return BlobAnswer(206, headers, byte_range.start, byte_range.length)
