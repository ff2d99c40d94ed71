"""Range header parsing (RFC 9110): valid ranges round-trip, the rest is ignored or 416."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.registry.ranges import ByteRange, Unsatisfiable, parse_range

sizes = st.integers(min_value=1, max_value=1 << 40)


# Only tests build Range headers (clients send them; the registry parses them).
def format_range(first: int | None, last: int | None) -> str:
    """The ``Range`` header value for a single range (``first=None`` makes a suffix range)."""
    if first is None:
        if last is None:
            raise ValueError("a suffix range needs a length")
        return f"bytes=-{last}"
    return f"bytes={first}-" + ("" if last is None else str(last))


@given(sizes, st.data())
def test_satisfiable_ranges_round_trip(size: int, data: st.DataObject) -> None:
    start = data.draw(st.integers(0, size - 1))
    end = data.draw(st.integers(start, size - 1))
    assert parse_range(format_range(start, end), size) == ByteRange(start, end, size)
    assert parse_range(format_range(start, None), size) == ByteRange(start, size - 1, size)
    suffix = size - start
    assert parse_range(format_range(None, suffix), size) == ByteRange(start, size - 1, size)


@given(sizes, st.data())
def test_last_pos_past_the_end_is_truncated(size: int, data: st.DataObject) -> None:
    start = data.draw(st.integers(0, size - 1))
    last = data.draw(st.integers(size, size * 4))
    result = parse_range(format_range(start, last), size)
    assert result == ByteRange(start, size - 1, size)
    assert result.length == size - start


@given(sizes, st.integers(0, 1 << 44))
def test_long_suffix_means_whole_blob(size: int, extra: int) -> None:
    assert parse_range(f"bytes=-{size + extra}", size) == ByteRange(0, size - 1, size)


@given(st.text(max_size=60), st.integers(min_value=0, max_value=1 << 40))
def test_any_header_never_raises(header: str, size: int) -> None:
    result = parse_range(header, size)
    if isinstance(result, ByteRange):
        assert 0 <= result.start <= result.end < size
        assert result.content_range() == f"bytes {result.start}-{result.end}/{size}"
    elif isinstance(result, Unsatisfiable):
        assert result.content_range() == f"bytes */{size}"


def test_conformance_cases_on_a_2048_byte_blob() -> None:
    assert parse_range("bytes=500-1499", 2048) == ByteRange(500, 1499, 2048)
    assert parse_range("bytes=500-1499", 2048).length == 1000  # type: ignore[union-attr]
    assert parse_range("bytes=500-", 2048) == ByteRange(500, 2047, 2048)
    assert parse_range("bytes=-500", 2048) == ByteRange(1548, 2047, 2048)
    assert parse_range("bytes=2000-5000", 2048) == ByteRange(2000, 2047, 2048)
    assert parse_range("bytes=500-0", 2048) == Unsatisfiable(2048)
    assert parse_range("bytes=5000-10000", 2048) == Unsatisfiable(2048)


@pytest.mark.parametrize(
    "header", [None, "", "bytes", "bytes=", "bytes=-", "bytes=a-b", "items=0-1", "bytes=0-1,3-4",
               "bytes=+1-2", "bytes=1-2-3", "bytes=٣-4"],
)  # fmt: skip
def test_ignored_headers(header: str | None) -> None:
    assert parse_range(header, 100) is None


@pytest.mark.parametrize("header", ["bytes=-0", "bytes=100-", "bytes=100-200", "bytes=9-3"])
def test_unsatisfiable(header: str) -> None:
    assert parse_range(header, 100) == Unsatisfiable(100)


def test_any_range_of_an_empty_blob_is_unsatisfiable() -> None:
    assert parse_range("bytes=0-", 0) == Unsatisfiable(0)
    assert parse_range("bytes=-5", 0) == Unsatisfiable(0)


def test_huge_numbers_are_capped_not_rejected() -> None:
    assert parse_range("bytes=" + "9" * 5000 + "-", 10) == Unsatisfiable(10)
    assert parse_range("bytes=3-" + "9" * 5000, 10) == ByteRange(3, 9, 10)
    assert parse_range("bytes= 3 - 4 ", 10) == ByteRange(3, 4, 10)
