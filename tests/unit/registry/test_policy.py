"""Serving policy: upstream registry, mirrored registries, latest, filters, default registry."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.k3s.mirror_policy import Policy, Target
from services.common.oci.errors import ErrorCode, OciError


def mirrored(*hosts: str) -> Policy:
    return Policy(lambda r: "*" in hosts or r in hosts)


def refusal(policy: Policy, ns: str | None, name: str, tag: str | None = None) -> OciError:
    with pytest.raises(OciError) as info:
        policy.check(ns, name, tag)
    return info.value


def test_store_key_uses_the_ns_registry() -> None:
    target = mirrored("ghcr.io").check("ghcr.io", "org/app", "v1")
    assert target == Target("ghcr.io", "org/app")
    assert target.store_key("v1") == "ghcr.io/org/app:v1"


def test_docker_hub_names_get_library_and_aliases_normalise() -> None:
    policy = mirrored("docker.io")
    assert policy.check("docker.io", "alpine", "3").store_key("3") == "docker.io/library/alpine:3"
    assert policy.check("index.docker.io", "library/alpine").registry == "docker.io"
    assert policy.check("docker.io", "org/app").name == "org/app"


def test_registry_not_mirrored_is_404_name_unknown() -> None:
    err = refusal(mirrored("docker.io"), "ghcr.io", "org/app", "v1")
    assert (err.status, err.code) == (404, ErrorCode.NAME_UNKNOWN)
    assert "not mirrored" in err.message


def test_wildcard_mirrors_everything() -> None:
    assert mirrored("*").check("quay.io", "x/y").registry == "quay.io"


def test_nothing_mirrored_refuses_everything() -> None:
    assert refusal(mirrored(), "docker.io", "library/alpine").status == 404


def test_no_ns_and_no_default_registry_is_404_with_a_clear_message() -> None:
    err = refusal(mirrored("*"), None, "library/alpine", "3")
    assert (err.status, err.code) == (404, ErrorCode.NAME_UNKNOWN)
    assert "default_registry" in err.message


def test_default_registry_applies_without_ns_only() -> None:
    policy = Policy(lambda r: r in ("docker.io", "ghcr.io"), default_registry="docker.io")
    assert policy.check(None, "alpine", "3").store_key("3") == "docker.io/library/alpine:3"
    assert policy.check("", "alpine").registry == "docker.io"
    assert policy.check("ghcr.io", "org/app").registry == "ghcr.io"


def test_latest_refused_unless_allowed() -> None:
    err = refusal(mirrored("*"), "docker.io", "library/alpine", "latest")
    assert (err.status, err.code) == (404, ErrorCode.MANIFEST_UNKNOWN)
    allowed = Policy(lambda r: True, allow_latest=True)
    assert allowed.check("docker.io", "library/alpine", "latest").name == "library/alpine"
    # Only the tag named exactly "latest" is refused.
    assert mirrored("*").check("docker.io", "library/alpine", "latest-1").name == "library/alpine"


def test_filters_gate_tags_only() -> None:
    policy = Policy(lambda r: True, filters=[r"^docker\.io/library/", r":v1\.\d+$"])
    assert policy.check("docker.io", "alpine", "3").name == "library/alpine"
    assert policy.check("ghcr.io", "org/app", "v1.2").name == "org/app"
    err = refusal(policy, "ghcr.io", "org/app", "v2.0")
    assert (err.status, err.code) == (404, ErrorCode.MANIFEST_UNKNOWN)
    # Digest requests (manifests and blobs) are not filtered: they are self-verifying.
    assert policy.check("ghcr.io", "org/app").name == "org/app"


def test_invalid_filter_or_default_registry_fails_at_construction() -> None:
    with pytest.raises(ValueError, match="filters"):
        Policy(lambda r: True, filters=["("])
    with pytest.raises(ValueError):
        Policy(lambda r: True, default_registry="not a host!")


def test_malformed_ns_is_400_name_invalid() -> None:
    err = refusal(mirrored("*"), "bad host/x", "library/alpine")
    assert (err.status, err.code) == (400, ErrorCode.NAME_INVALID)


@given(st.one_of(st.none(), st.text(max_size=40)), st.text(max_size=40), st.text(max_size=20))
def test_policy_never_raises_anything_but_4xx(ns: str | None, name: str, tag: str) -> None:
    policy = Policy(lambda r: r != "blocked.io", default_registry="docker.io", filters=["a"])
    try:
        policy.check(ns, name, tag)
    except OciError as err:
        assert 400 <= err.status < 500
