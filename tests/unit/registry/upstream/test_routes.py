"""Which endpoints the upstream client contacts: exactly containerd's list under K3s rules."""

from __future__ import annotations

import re

import pytest

from services.common.k3s.endpoints import endpoint_list, normalize_endpoint
from services.common.k3s.registries import parse_endpoint, parse_registries
from services.registry.upstream.routes import go_expand, rewrite_repository, routes_for

OWN = ("127.0.0.1:6443",)


def urls(yaml_text: str, registry: str, *, disable: bool = False) -> list[str]:
    routes = routes_for(
        parse_registries(yaml_text), registry, disable_default=disable, own_hosts=OWN
    )
    return [r.url("library/alpine", "blobs", "sha256:" + "a" * 64) for r in routes]


DIGEST = "sha256:" + "a" * 64


def test_listed_endpoints_first_then_the_default_endpoint_with_ns_only_for_mirrors() -> None:
    text = (
        "mirrors:\n  docker.io:\n    endpoint: [mirror.example:5000, 'http://10.0.0.9:5000/v2/']\n"
    )
    assert urls(text, "docker.io") == [
        f"https://mirror.example:5000/v2/library/alpine/blobs/{DIGEST}?ns=docker.io",
        f"http://10.0.0.9:5000/v2/library/alpine/blobs/{DIGEST}?ns=docker.io",
        f"https://registry-1.docker.io/v2/library/alpine/blobs/{DIGEST}",
    ]


def test_disable_default_endpoint_leaves_only_the_listed_ones() -> None:
    text = "mirrors:\n  registry.test:5000:\n    endpoint: ['http://127.0.0.1:5999']\n"
    assert urls(text, "registry.test:5000", disable=True) == [
        f"http://127.0.0.1:5999/v2/library/alpine/blobs/{DIGEST}?ns=registry.test%3A5000"
    ]
    assert urls(text, "registry.test:5000")[-1].startswith("https://registry.test:5000/v2/")


def test_disabled_default_and_no_endpoint_means_no_route() -> None:
    assert urls("mirrors:\n  docker.io: {}\n", "docker.io", disable=True) == []


def test_the_embedded_mirror_is_never_an_upstream() -> None:
    text = "mirrors:\n  docker.io:\n    endpoint: ['https://127.0.0.1:6443', 'http://127.0.0.1:7000']\n"
    hosts = [u.split("/")[2] for u in urls(text, "docker.io")]
    assert hosts == ["127.0.0.1:7000", "registry-1.docker.io"]


def test_wildcard_endpoints_serve_registries_not_listed_themselves() -> None:
    text = "mirrors:\n  '*':\n    endpoint: ['http://127.0.0.1:7000']\n  quay.io: {}\n"
    assert [u.split("?")[0].split("/")[2] for u in urls(text, "ghcr.io")] == [
        "127.0.0.1:7000",
        "ghcr.io",
    ]
    assert [u.split("/")[2] for u in urls(text, "quay.io")] == ["quay.io"]


def test_duplicates_are_dropped_and_the_registry_listed_last_is_its_default_endpoint() -> None:
    text = (
        "mirrors:\n  registry.test:\n    endpoint:\n"
        "      - http://a.test\n      - https://a.test/v2\n      - http://registry.test\n"
    )
    routes = routes_for(parse_registries(text), "registry.test", disable_default=False)
    assert [(r.endpoint.url, r.is_default) for r in routes] == [
        ("http://a.test/v2", False),
        ("http://registry.test/v2", True),
    ]


def test_rewrites_apply_to_mirrors_never_to_the_default_endpoint() -> None:
    text = (
        "mirrors:\n  docker.io:\n    endpoint: ['http://127.0.0.1:7000']\n"
        "    rewrite:\n      '^library/(.*)': 'mirrored/$1'\n"
    )
    routes = routes_for(parse_registries(text), "docker.io", disable_default=False)
    assert [r.repository("library/alpine") for r in routes] == [
        "mirrored/alpine",
        "library/alpine",
    ]
    assert routes[0].url("library/alpine", "manifests", "3.19") == (
        "http://127.0.0.1:7000/v2/mirrored/alpine/manifests/3.19?ns=docker.io"
    )


def test_override_path_endpoints_keep_their_path() -> None:
    text = "mirrors:\n  docker.io:\n    endpoint: ['https://proxy.test/registry/v2/dockerhub']\n"
    assert urls(text, "docker.io")[0] == (
        f"https://proxy.test/registry/v2/dockerhub/library/alpine/blobs/{DIGEST}?ns=docker.io"
    )


def test_tls_and_auth_come_from_the_endpoint_host_config() -> None:
    text = (
        "mirrors:\n  docker.io:\n    endpoint: ['https://mirror.test:5000', 'http://plain.test']\n"
        "configs:\n"
        "  mirror.test:5000:\n    tls: {ca_file: /ca.pem}\n    auth: {username: u, password: p}\n"
        "  plain.test:\n    tls: {ca_file: /ignored.pem}\n"
        "  docker.io:\n    auth: {username: hub, password: pw}\n"
    )
    mirror, plain, hub = routes_for(parse_registries(text), "docker.io", disable_default=False)
    assert mirror.tls is not None and mirror.tls.ca_file == "/ca.pem"
    assert mirror.auth is not None and mirror.auth.username == "u"
    assert plain.tls is None  # TLS files mean nothing to plain http
    assert hub.host == "registry-1.docker.io"
    assert hub.auth is not None and hub.auth.username == "hub"


@pytest.mark.parametrize(
    ("rewrites", "expected"),
    [
        ((("^library/(.*)", "x/$1"),), "x/alpine"),
        ((("^library/(?P<rest>.*)", "y/${rest}"),), "y/alpine"),
        ((("^nomatch", "z"), ("alp", "ALP")), "library/ALPine"),
        ((("^library/(.*)", "$1x"),), ""),  # Go: `$1x` names group "1x", which is empty
        ((("^library/(.*)", "cost$$/$1"),), "cost$/alpine"),
        ((), "library/alpine"),
    ],
)
def test_rewrite_uses_go_replacement_syntax_first_changing_rule_wins(
    rewrites: tuple[tuple[str, str], ...], expected: str
) -> None:
    assert rewrite_repository("library/alpine", rewrites) == expected


def test_go_expand_unknown_group_is_empty() -> None:
    match = re.match(r"(a)(?P<b>b)", "ab")
    assert match is not None
    assert go_expand("$2-$b-$9-${nope}-$1", match) == "b-b---a"


def test_endpoint_list_is_the_one_the_hosts_toml_renderer_uses() -> None:
    listed = [normalize_endpoint(parse_endpoint(u, "t", "k")) for u in ("localhost:5000", "x.test")]
    plan = endpoint_list(listed, None, disable_default=False)
    assert [e.url for e in plan.mirrors] == ["http://localhost:5000/v2", "https://x.test/v2"]
    assert plan.server is None
