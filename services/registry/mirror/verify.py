"""Checks on what a peer sends: digests of bodies (whole or streamed) and blob answer headers.

A peer is trusted for nothing: a manifest is only served once its bytes hash to the digest asked
for (or, for a tag, to the digest the peer names); a blob answer must carry the requested digest,
an exact length and, for a range, a Content-Range that is exactly the span asked for.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

from services.common.errors import PeermirrorError
from services.common.oci.grammar import parse_digest
from services.registry.ranges import ByteRange

_CONTENT_RANGE_RE = re.compile(r"bytes (\d{1,18})-(\d{1,18})/(\d{1,18})")


class PeerAnswerError(PeermirrorError):
    """A peer's answer is unusable (wrong status, missing or inconsistent headers)."""


class DigestMismatchError(PeerAnswerError):
    """A peer's bytes do not hash to the digest they were sent for: the peer is misbehaving."""


class RunningHash:
    """The digest of a body fed in pieces, compared with the digest it should have."""

    def __init__(self, digest: str) -> None:
        parsed = parse_digest(digest)
        self.digest = digest
        self._expected = parsed.encoded
        self._hash = hashlib.new(parsed.algorithm)
        self.size = 0

    def update(self, data: bytes | memoryview) -> None:
        self._hash.update(data)
        self.size += len(data)

    def matches(self) -> bool:
        """Whether everything fed so far hashes to the expected digest."""
        return self._hash.hexdigest() == self._expected

    def prefix_digest(self) -> str:
        """The hex digest of everything fed so far (the hash goes on; evidence of a prefix)."""
        return self._hash.copy().hexdigest()


def parse_content_range(value: str | None) -> ByteRange | None:
    """A ``bytes a-b/size`` Content-Range value, None when absent, malformed or inconsistent."""
    if value is None:
        return None
    match = _CONTENT_RANGE_RE.fullmatch(value.strip())
    if match is None:
        return None
    start, end, size = (int(g) for g in match.groups())
    if start > end or end >= size:
        return None
    return ByteRange(start, end, size)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    return None if value is None else value.strip()


def check_blob_answer(
    status: int,
    headers: Mapping[str, str],
    digest: str,
    wanted: ByteRange | None,
    *,
    digest_header: str,
) -> ByteRange:
    """The span a peer's blob answer (GET or HEAD) covers, or PeerAnswerError.

    `wanted` None: the client's own request was forwarded, so a 200 (whole blob) or a 206 are both
    acceptable; otherwise exactly a 206 for `wanted` is. `headers` must be case-insensitive.
    """
    named = _header(headers, digest_header)
    if named is None:
        raise PeerAnswerError(f"answer has no {digest_header} header")
    if named != digest:
        raise PeerAnswerError(f"answer is for {named}, not {digest}")
    length_text = _header(headers, "Content-Length")
    if length_text is None or not length_text.isdigit():
        raise PeerAnswerError("answer has no valid Content-Length")
    length = int(length_text)
    if status == 200 and wanted is None:
        return ByteRange(0, length - 1, length)
    if status != 206:
        raise PeerAnswerError(f"unexpected status {status}")
    span = parse_content_range(_header(headers, "Content-Range"))
    if span is None:
        raise PeerAnswerError("206 answer without a valid Content-Range")
    if span.length != length:
        raise PeerAnswerError("Content-Range and Content-Length disagree")
    if wanted is not None and span != wanted:
        raise PeerAnswerError(f"answer covers {span}, not {wanted}")
    return span
