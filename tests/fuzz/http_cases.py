"""Hypothesis strategies for requests to the pull API: paths, queries, headers and methods."""

from __future__ import annotations

import string
import urllib.parse
from dataclasses import dataclass

from hypothesis import strategies as st

from services.common.request_id import HTTP_HEADER as REQUEST_ID_HEADER
from services.registry.headers import PEER_HEADER

METHODS = ["GET", "GET", "GET", "HEAD", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "FOO"]
# Characters a header value may carry on the wire (no CR/LF: those would end the head).
_HEADER_TEXT = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)
_TOKEN = st.text(alphabet=string.ascii_letters + string.digits + "-_", min_size=1, max_size=30)


@dataclass(frozen=True)
class HttpCase:
    """One generated request; `well_formed` when every byte is valid HTTP (then a 4xx under
    /v2 must be our OCI error body)."""

    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    well_formed: bool

    @property
    def target(self) -> str:
        return self.path + (f"?{self.query}" if self.query else "")


def names() -> st.SearchStrategy[str]:
    """Repository names: valid, almost valid, traversal, unicode, very long."""
    component = st.text(alphabet=string.ascii_lowercase + string.digits + "._-", max_size=12)
    return st.one_of(
        st.sampled_from(
            ["library/fuzz", "fuzz", "library/fuzz/", "../../etc", "a/../../b", "..", "."]
        ),
        st.lists(component, min_size=1, max_size=6).map("/".join),
        st.text(max_size=40),
        st.integers(200, 6000).map(lambda n: "a" * n),
    )


def references(digests: list[str]) -> st.SearchStrategy[str]:
    """Tags and digests: the served ones, random ones and malformed ones."""
    hexdigits = st.text(alphabet="0123456789abcdef", min_size=0, max_size=70)
    return st.one_of(
        st.sampled_from(["1.0", "latest", "", "sha256:", "sha512:ab", "SHA256:" + "a" * 64]),
        st.sampled_from(digests),
        hexdigits.map(lambda h: f"sha256:{h}"),
        st.text(max_size=40),
    )


def paths(digests: list[str]) -> st.SearchStrategy[str]:
    """Request paths (not yet encoded) under /v2 and elsewhere."""
    name = names()
    ref = references(digests)
    return st.one_of(
        st.sampled_from(
            ["/v2", "/v2/", "/v2/_catalog", "/", "/livez", "/readyz", "/metrics", "//v2/"]
        ),
        st.tuples(name, st.sampled_from(["manifests", "blobs", "tags/list", "x"]), ref).map(
            lambda t: f"/v2/{t[0]}/{t[1]}/{t[2]}"
        ),
        st.lists(st.text(max_size=20), max_size=8).map(lambda parts: "/v2/" + "/".join(parts)),
        st.text(max_size=60).map(lambda s: "/" + s),
    )


def queries() -> st.SearchStrategy[str]:
    """Query strings: ns variants (right, wrong, repeated, huge) and random pairs."""
    ns_value = st.one_of(
        st.sampled_from(["docker.io", "", "quay.io", "127.0.0.1:9", "docker.io/../x", "DOCKER.IO"]),
        st.text(max_size=30),
        st.integers(500, 3000).map(lambda n: "d" * n),
    )
    pair = st.tuples(st.text(max_size=10), st.text(max_size=20))
    return st.one_of(
        st.just(""),
        ns_value.map(lambda v: urllib.parse.urlencode({"ns": v})),
        st.lists(ns_value, min_size=2, max_size=3).map(
            lambda vs: "&".join(urllib.parse.urlencode({"ns": v}) for v in vs)
        ),
        st.lists(pair, max_size=4).map(urllib.parse.urlencode),
    )


def range_values() -> st.SearchStrategy[str]:
    n = st.integers(-5, 2**64)
    return st.one_of(
        st.tuples(n, n).map(lambda t: f"bytes={t[0]}-{t[1]}"),
        n.map(lambda a: f"bytes={a}-"),
        n.map(lambda a: f"bytes=-{a}"),
        st.sampled_from(["bytes=", "bytes=0-0,5-9", "items=0-1", "bytes=-", "bytes=1-0", ""]),
        _HEADER_TEXT,
    )


def headers() -> st.SearchStrategy[list[tuple[str, str]]]:
    one = st.one_of(
        range_values().map(lambda v: ("Range", v)),
        st.sampled_from(
            [
                "application/vnd.oci.image.manifest.v1+json",
                "application/vnd.docker.distribution.manifest.v2+json",
                "*/*",
                "",
            ]
        ).map(lambda v: ("Accept", v)),
        _HEADER_TEXT.map(lambda v: (PEER_HEADER, v)),
        _HEADER_TEXT.map(lambda v: (REQUEST_ID_HEADER, v)),
        st.tuples(_TOKEN, _HEADER_TEXT),
        st.integers(1000, 12000).map(lambda n: ("X-Big", "b" * n)),
    )
    return st.lists(one, max_size=5)


def http_cases(digests: list[str]) -> st.SearchStrategy[HttpCase]:
    """Mostly well-formed requests (percent-encoded targets); some carry raw UTF-8 bytes."""

    # Built once: constructing (and validating) strategies per draw would dominate the run.
    path_strategy = paths(digests)
    query_strategy = queries()
    header_strategy = headers()
    encode_strategy = st.integers(0, 9).map(lambda n: n > 0)
    method_strategy = st.sampled_from(METHODS)

    @st.composite
    def build(draw: st.DrawFn) -> HttpCase:
        raw_path = draw(path_strategy)
        encode = draw(encode_strategy)
        path = urllib.parse.quote(raw_path, safe="/:@") if encode else raw_path
        return HttpCase(
            method=draw(method_strategy),
            path=path,
            query=draw(query_strategy),
            headers=draw(header_strategy),
            well_formed=encode,
        )

    return build()
