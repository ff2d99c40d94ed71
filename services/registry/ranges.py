"""HTTP Range requests on blobs (RFC 9110 section 14), decided without touching the content.

What a ``Range`` header yields for a blob of ``size`` bytes:

- absent, another unit, several ranges (``bytes=0-1,5-9``) or malformed syntax: the header is
  ignored and the whole blob is served with 200 (RFC 9110 14.2 lets a server ignore Range; we
  never build multipart responses, and a garbled header must not break a pull);
- one satisfiable range (``a-b``, ``a-``, ``-n``): 206 for ``[start, end]``, a ``last-pos`` past
  the end truncated to the last byte and a suffix longer than the blob meaning the whole blob;
- ``a-b`` with ``b < a`` (an invalid range-spec), ``a`` at or past the end, ``-0``, or any range on
  an empty blob: unsatisfiable, answered 416 with ``Content-Range: bytes */size`` (RFC 9110 lets a
  server reject invalid ranges; the OCI conformance suite expects 416 for ``bytes=500-0``).
"""

from __future__ import annotations

from dataclasses import dataclass

# Positions are capped here so a 4,000-digit number neither trips Python's int-parsing limit nor
# costs time; no blob comes anywhere near this size.
_MAX_POSITION = 1 << 62
_MAX_DIGITS = 18


@dataclass(frozen=True, slots=True)
class ByteRange:
    """Bytes ``start`` to ``end`` inclusive of a ``size``-byte blob: a satisfiable range a client
    asked for, or the span a peer's answer covers (all of an empty blob is ``0, -1, 0``)."""

    start: int
    end: int
    size: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.end == self.size - 1

    def content_range(self) -> str:
        return f"bytes {self.start}-{self.end}/{self.size}"

    def range_header(self) -> str:
        """The ``Range`` request header that asks for these bytes."""
        return f"bytes={self.start}-{self.end}"


@dataclass(frozen=True, slots=True)
class Unsatisfiable:
    """The single range asked for selects no byte of a ``size``-byte blob (answer 416)."""

    size: int

    def content_range(self) -> str:
        return f"bytes */{self.size}"


RangeResult = ByteRange | Unsatisfiable | None
"""None means "ignore the header, serve everything"."""


def _position(text: str) -> int | None:
    """A non-negative decimal position, None when `text` is not one (capped, never raises)."""
    if not text or not text.isascii() or not text.isdigit():
        return None
    stripped = text.lstrip("0")
    if len(stripped) > _MAX_DIGITS:
        return _MAX_POSITION
    return int(stripped) if stripped else 0


def parse_range(header: str | None, size: int) -> RangeResult:
    """What a ``Range`` header selects of a ``size``-byte blob (see the module docstring)."""
    if header is None:
        return None
    unit, eq, spec = header.partition("=")
    if not eq or unit.strip().lower() != "bytes":
        return None
    spec = spec.strip(" \t")
    if "," in spec:
        return None
    first_text, dash, last_text = spec.partition("-")
    if not dash:
        return None
    first_text, last_text = first_text.strip(" \t"), last_text.strip(" \t")
    if first_text == "":
        suffix = _position(last_text)
        if suffix is None:
            return None
        if suffix == 0 or size == 0:
            return Unsatisfiable(size)
        return ByteRange(max(0, size - suffix), size - 1, size)
    first = _position(first_text)
    if first is None:
        return None
    last: int | None = None
    if last_text != "":
        last = _position(last_text)
        if last is None:
            return None
        if last < first:
            return Unsatisfiable(size)
    if first >= size:
        return Unsatisfiable(size)
    end = size - 1 if last is None else min(last, size - 1)
    return ByteRange(first, end, size)
