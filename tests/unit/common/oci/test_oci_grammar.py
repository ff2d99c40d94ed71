"""OCI grammar: names, tags, digests and references, exactly per the spec regexes."""

from __future__ import annotations

import hashlib
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.oci.errors import ErrorCode, OciError
from services.common.oci.grammar import (
    NAME_PATTERN,
    NAME_TOTAL_LENGTH_MAX,
    TAG_PATTERN,
    Digest,
    DigestInvalidError,
    GrammarError,
    NameInvalidError,
    Reference,
    TagInvalidError,
    UnsupportedDigestError,
    is_digest_syntax,
    is_valid_digest,
    is_valid_name,
    is_valid_tag,
    looks_like_registry,
    normalize_name,
    normalize_registry,
    parse_digest,
    parse_reference,
    store_key,
    validate_digest,
    validate_name,
    validate_registry,
    validate_tag,
)

SHA256 = "sha256:" + hashlib.sha256(b"x").hexdigest()
SHA512 = "sha512:" + hashlib.sha512(b"x").hexdigest()

# The spec's own regexes, written out here independently of the module under test.
SPEC_NAME = r"[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*"
SPEC_TAG = r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}"

# Names are built from the grammar's parts (faster than st.from_regex on the whole pattern);
# test_generated_names_are_valid also checks each against the spec regex.
_alnum = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8)
_separator = st.sampled_from([".", "_", "__"]) | st.integers(1, 3).map(lambda n: "-" * n)
_component = st.builds(
    lambda first, rest: first + "".join(sep + part for sep, part in rest),
    _alnum,
    st.lists(st.tuples(_separator, _alnum), max_size=3),
)
names = st.lists(_component, min_size=1, max_size=4).map("/".join)
tags = st.from_regex(SPEC_TAG, fullmatch=True)
hex_chars = "0123456789abcdef"
sha256_digests = st.text(hex_chars, min_size=64, max_size=64).map(lambda h: f"sha256:{h}")
sha512_digests = st.text(hex_chars, min_size=128, max_size=128).map(lambda h: f"sha512:{h}")
digests = sha256_digests | sha512_digests


def test_module_patterns_are_the_spec_patterns() -> None:
    # Same language, written with non-capturing groups.
    assert NAME_PATTERN.replace("?:", "") == SPEC_NAME.replace("\\/", "/")
    assert TAG_PATTERN == SPEC_TAG


@pytest.mark.parametrize(
    "name",
    [
        "nginx",
        "library/nginx",
        "a/b/c/d",
        "my.org/app",
        "foo_bar",
        "foo__bar",
        "foo-bar",
        "foo---bar",
        "f.o.o",
        "0",
        "a" * 255,
    ],
)
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name
    assert is_valid_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "Nginx",
        "foo/",
        "/foo",
        "foo//bar",
        "foo___bar",
        "foo..bar",
        "foo.-bar",
        "-foo",
        "foo-",
        "foo_",
        ".foo",
        "foo bar",
        "foo:bar",
        "a" * 256,
        "ñ",
    ],
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(NameInvalidError) as err:
        validate_name(name)
    assert err.value.code is ErrorCode.NAME_INVALID
    assert err.value.status == 400
    assert not is_valid_name(name)


def test_name_cap_counts_the_registry() -> None:
    registry = "registry.example.com"
    fits = "a" * (NAME_TOTAL_LENGTH_MAX - len(registry) - 1)
    assert validate_name(fits, registry) == fits
    with pytest.raises(NameInvalidError, match="longer than 255"):
        validate_name(fits + "a", registry)


@pytest.mark.parametrize("tag", ["latest", "v1.2.3", "_x", "1", "A-b_c.d", "a" * 128])
def test_valid_tags(tag: str) -> None:
    assert validate_tag(tag) == tag
    assert is_valid_tag(tag)


@pytest.mark.parametrize("tag", ["", ".x", "-x", "a" * 129, "a:b", "a/b", "a b", "a@b"])
def test_invalid_tags(tag: str) -> None:
    with pytest.raises(TagInvalidError) as err:
        validate_tag(tag)
    # Documented choice: an invalid tag names a manifest that cannot exist.
    assert err.value.code is ErrorCode.MANIFEST_UNKNOWN
    assert err.value.status == 404
    assert not is_valid_tag(tag)


def test_valid_digests() -> None:
    assert parse_digest(SHA256) == Digest("sha256", SHA256[7:])
    assert str(parse_digest(SHA512)) == SHA512
    assert validate_digest(SHA256) == SHA256
    assert is_valid_digest(SHA512)


@pytest.mark.parametrize(
    "digest",
    [
        "",
        "sha256",
        "sha256:",
        ":" + "a" * 64,
        "sha256:" + "a" * 63,
        "sha256:" + "a" * 65,
        "sha256:" + "A" * 64,
        "sha256:" + "g" * 64,
        "sha512:" + "a" * 64,
        "SHA256:" + "a" * 64,
        "sha256:totallywrong",
        "sha256:" + "a" * 64 + "\n",
        "sha256::" + "a" * 64,
    ],
)
def test_invalid_digests(digest: str) -> None:
    with pytest.raises(DigestInvalidError) as err:
        parse_digest(digest)
    assert not isinstance(err.value, UnsupportedDigestError)
    assert err.value.code is ErrorCode.DIGEST_INVALID
    assert err.value.status == 400
    assert not is_valid_digest(digest)


@pytest.mark.parametrize("digest", ["md5:abc", "sha384:" + "a" * 96, "multihash+base58:QmRZxt2b1F"])
def test_unknown_algorithms_are_well_formed_but_unsupported(digest: str) -> None:
    assert is_digest_syntax(digest)
    with pytest.raises(UnsupportedDigestError) as err:
        parse_digest(digest)
    assert err.value.code is ErrorCode.DIGEST_INVALID
    assert "unsupported" in err.value.message


def test_grammar_errors_are_value_and_oci_errors() -> None:
    with pytest.raises(ValueError):
        validate_name("BAD")
    with pytest.raises(OciError) as err:
        validate_tag(".bad")
    assert err.value.detail == {"value": ".bad"}


# --- registries and references ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("component", "expected"),
    [
        ("docker.io", True),
        ("localhost", True),
        ("localhost:5000", True),
        ("127.0.0.1:9", True),
        ("Registry", True),
        ("library", False),
        ("my-org", False),
    ],
)
def test_looks_like_registry(component: str, expected: bool) -> None:
    assert looks_like_registry(component) is expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("nginx", Reference("docker.io", "library/nginx")),
        ("nginx:1.25", Reference("docker.io", "library/nginx", "1.25")),
        ("bitnami/redis:7", Reference("docker.io", "bitnami/redis", "7")),
        ("docker.io/nginx:1", Reference("docker.io", "library/nginx", "1")),
        ("index.docker.io/nginx:1", Reference("docker.io", "library/nginx", "1")),
        ("ghcr.io/owner/app:v1", Reference("ghcr.io", "owner/app", "v1")),
        ("ghcr.io/app:v1", Reference("ghcr.io", "app", "v1")),
        ("localhost/app", Reference("localhost", "app")),
        ("localhost:5000/a/b:t", Reference("localhost:5000", "a/b", "t")),
        ("127.0.0.1:9/x@" + SHA256, Reference("127.0.0.1:9", "x", None, SHA256)),
        ("[::1]:5000/x:y", Reference("[::1]:5000", "x", "y")),
        (
            "quay.io/org/app:1.0@" + SHA512,
            Reference("quay.io", "org/app", "1.0", SHA512),
        ),
        ("localhost:5000", Reference("docker.io", "library/localhost", "5000")),
    ],
)
def test_parse_reference(text: str, expected: Reference) -> None:
    assert parse_reference(text) == expected


def test_parse_reference_without_normalisation() -> None:
    ref = parse_reference("nginx:1", default_registry="docker.io", normalize=False)
    assert ref == Reference("docker.io", "nginx", "1")
    other = parse_reference("app:1", default_registry="registry.local:5000")
    assert other == Reference("registry.local:5000", "app", "1")


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", NameInvalidError),
        ("Nginx:1", NameInvalidError),
        ("ghcr.io/Owner/app", NameInvalidError),
        ("bad_host_.io/app", NameInvalidError),
        ("-bad.io/app", NameInvalidError),
        ("nginx:.bad", TagInvalidError),
        ("nginx@sha256:short", DigestInvalidError),
        ("nginx@md5:abc", UnsupportedDigestError),
        ("ghcr.io/", NameInvalidError),
    ],
)
def test_parse_reference_errors(text: str, error: type[GrammarError]) -> None:
    with pytest.raises(error):
        parse_reference(text)


def test_reference_formatting_and_store_key() -> None:
    ref = parse_reference("ghcr.io/owner/app:v1@" + SHA256)
    assert str(ref) == "ghcr.io/owner/app:v1@" + SHA256
    assert ref.name == "ghcr.io/owner/app"
    assert ref.store_key() == "ghcr.io/owner/app:v1"
    assert store_key("docker.io", "library/nginx", "1.25") == "docker.io/library/nginx:1.25"
    with pytest.raises(ValueError):
        parse_reference("ghcr.io/owner/app@" + SHA256).store_key()


def test_normalisation_helpers() -> None:
    assert normalize_registry("index.docker.io") == "docker.io"
    assert normalize_registry("ghcr.io") == "ghcr.io"
    assert normalize_name("docker.io", "nginx") == "library/nginx"
    assert normalize_name("index.docker.io", "nginx") == "library/nginx"
    assert normalize_name("docker.io", "bitnami/redis") == "bitnami/redis"
    assert normalize_name("ghcr.io", "app") == "app"
    assert validate_registry("registry-1.docker.io:443") == "registry-1.docker.io:443"
    with pytest.raises(NameInvalidError):
        validate_registry("bad host")


# --- properties ------------------------------------------------------------------------------


@given(names)
def test_generated_names_are_valid(name: str) -> None:
    assert re.fullmatch(SPEC_NAME, name)
    assert validate_name(name) == name


@given(tags)
def test_generated_tags_are_valid(tag: str) -> None:
    assert validate_tag(tag) == tag


@given(digests)
def test_generated_digests_round_trip(digest: str) -> None:
    assert str(parse_digest(digest)) == digest


@given(names, tags, digests, st.sampled_from(["ghcr.io", "localhost:5000", "10.0.0.1:6443"]))
def test_generated_references_round_trip(name: str, tag: str, digest: str, registry: str) -> None:
    text = f"{registry}/{name}:{tag}@{digest}"
    ref = parse_reference(text)
    assert ref == Reference(registry, name, tag, digest)
    assert str(ref) == text
    assert parse_reference(str(ref)) == ref


@given(st.text(max_size=300) | st.text("ab0._-/A", max_size=40))
def test_arbitrary_names_raise_only_the_typed_error(text: str) -> None:
    spec_valid = re.fullmatch(SPEC_NAME, text) is not None and len(text) <= 255
    try:
        validate_name(text)
    except NameInvalidError:
        assert not spec_valid
    else:
        assert spec_valid


@given(st.text(max_size=200) | st.text("aZ0._-:", max_size=140))
def test_arbitrary_tags_raise_only_the_typed_error(text: str) -> None:
    spec_valid = re.fullmatch(SPEC_TAG, text) is not None
    try:
        validate_tag(text)
    except TagInvalidError:
        assert not spec_valid
    else:
        assert spec_valid


@given(st.text(max_size=200) | st.text(hex_chars + ":sha256", max_size=80))
def test_arbitrary_digests_raise_only_the_typed_error(text: str) -> None:
    try:
        parse_digest(text)
    except DigestInvalidError:
        assert not is_valid_digest(text)


@given(
    st.text(max_size=200)
    | st.text("abc019./:@_-ABsha256", max_size=120)
    | st.builds(lambda n, t: f"{n}:{t}", names, st.text(max_size=20))
)
def test_arbitrary_references_raise_only_grammar_errors(text: str) -> None:
    try:
        ref = parse_reference(text)
    except GrammarError as err:
        assert isinstance(err, OciError)
        assert err.status in (400, 404)
    else:
        assert is_valid_name(ref.repository)
        assert ref.tag is None or is_valid_tag(ref.tag)
        assert ref.digest is None or is_valid_digest(ref.digest)
