"""The /v2/ path parser: valid paths round-trip, anything else is a 4xx OciError, nothing raises."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.oci.errors import ErrorCode, OciError
from services.common.oci.grammar import NAME_PATTERN, TAG_PATTERN
from services.registry.paths import BASE, Kind, Route, kind_hint, parse_v2_path

# Built from parts (much faster than generating from the spec regex); checked against it below.
_alnum = st.text("abcxyz0189", min_size=1, max_size=6)
_component = st.builds(
    lambda first, rest: first + "".join(sep + part for sep, part in rest),
    _alnum,
    st.lists(st.tuples(st.sampled_from([".", "_", "__", "-", "---"]), _alnum), max_size=3),
)
names = st.lists(_component, min_size=1, max_size=5).map("/".join)
tags = st.from_regex(rf"\A{TAG_PATTERN}\Z")
digests = st.one_of(
    st.text("0123456789abcdef", min_size=64, max_size=64).map(lambda h: f"sha256:{h}"),
    st.text("0123456789abcdef", min_size=128, max_size=128).map(lambda h: f"sha512:{h}"),
)


@given(names, tags)
def test_tag_manifest_paths_round_trip(name: str, tag: str) -> None:
    assert re.fullmatch(NAME_PATTERN, name)
    route = parse_v2_path(f"{name}/manifests/{tag}")
    assert route == Route(Kind.MANIFEST, name, tag=tag)
    assert parse_v2_path(route.to_path()) == route


@given(names, digests, st.sampled_from([Kind.MANIFEST, Kind.BLOB]))
def test_digest_paths_round_trip(name: str, digest: str, kind: Kind) -> None:
    segment = "manifests" if kind is Kind.MANIFEST else "blobs"
    route = parse_v2_path(f"{name}/{segment}/{digest}")
    assert route == Route(kind, name, digest=digest)
    assert route.reference == digest
    assert parse_v2_path(route.to_path()) == route
    assert kind_hint(route.to_path()) is kind


@given(st.text(max_size=400))
def test_any_path_parses_or_gives_a_4xx_oci_error(path: str) -> None:
    try:
        route = parse_v2_path(path)
    except OciError as err:
        assert 400 <= err.status < 500
        return
    assert parse_v2_path(route.to_path()) == route


def test_base_path() -> None:
    assert parse_v2_path("") == BASE
    assert parse_v2_path("/") == BASE


def test_names_with_the_endpoint_words_in_them() -> None:
    route = parse_v2_path("a/manifests/b/blobs/c/manifests/v1")
    assert route == Route(Kind.MANIFEST, "a/manifests/b/blobs/c", tag="v1")


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("app/manifests/.INVALID_MANIFEST_NAME", 404, ErrorCode.MANIFEST_UNKNOWN),
        ("app/manifests/sha256:totallywrong", 400, ErrorCode.DIGEST_INVALID),
        ("app/manifests/md5:abcd", 400, ErrorCode.DIGEST_INVALID),
        ("app/blobs/notadigest", 400, ErrorCode.DIGEST_INVALID),
        ("App/manifests/1.0", 400, ErrorCode.NAME_INVALID),
        ("app/tags/list", 404, ErrorCode.UNSUPPORTED),
        ("_catalog", 404, ErrorCode.UNSUPPORTED),
        ("app/blobs/uploads/", 404, ErrorCode.UNSUPPORTED),
        ("app/manifests/", 404, ErrorCode.UNSUPPORTED),
        ("a" * 2000 + "/manifests/1", 404, ErrorCode.UNSUPPORTED),
    ],
)
def test_invalid_paths(path: str, status: int, code: ErrorCode) -> None:
    with pytest.raises(OciError) as info:
        parse_v2_path(path)
    assert (info.value.status, info.value.code) == (status, code)
