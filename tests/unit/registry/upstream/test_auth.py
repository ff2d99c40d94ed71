"""WWW-Authenticate parsing, credentials from registries.yaml, token requests and the cache."""

from __future__ import annotations

import base64
import urllib.parse

import pytest

from services.common.k3s.registries import AuthConfig
from services.registry.upstream.challenge import Challenge, parse_challenges
from services.registry.upstream.credentials import (
    ANONYMOUS,
    CredentialsError,
    credentials_from,
    token_request,
)
from services.registry.upstream.tokens import (
    DEFAULT_EXPIRES_IN,
    EXPIRY_MARGIN,
    Token,
    TokenCache,
    TokenResponseError,
    parse_token_response,
)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
            'scope="repository:library/alpine:pull"',
            [
                Challenge(
                    "bearer",
                    {
                        "realm": "https://auth.docker.io/token",
                        "service": "registry.docker.io",
                        "scope": "repository:library/alpine:pull",
                    },
                )
            ],
        ),
        ('Basic realm="Registry Realm"', [Challenge("basic", {"realm": "Registry Realm"})]),
        (
            'Basic realm="a", Bearer realm="https://t/x" , service=reg',
            [
                Challenge("basic", {"realm": "a"}),
                Challenge("bearer", {"realm": "https://t/x", "service": "reg"}),
            ],
        ),
        (
            'BEARER Realm="q\\"uo\\\\te",scope="repository:a:pull,push"',
            [Challenge("bearer", {"realm": 'q"uo\\te', "scope": "repository:a:pull,push"})],
        ),
        ("Negotiate", [Challenge("negotiate", {})]),
        ("", []),
        ('Bearer realm="unterminated', [Challenge("bearer", {"realm": "unterminated"})]),
        ("=garbage", []),
    ],
)
def test_parse_challenges(header: str, expected: list[Challenge]) -> None:
    assert parse_challenges(header) == expected


def test_credentials_username_password_and_auth_field() -> None:
    creds = credentials_from(AuthConfig(username="u", password="p"))
    assert creds.basic_header() == "Basic " + base64.b64encode(b"u:p").decode()
    encoded = base64.b64encode(b"alice:s3:cret").decode()
    creds = credentials_from(AuthConfig(auth=encoded))
    assert (creds.username, creds.password) == ("alice", "s3:cret")
    assert credentials_from(None) is ANONYMOUS
    assert ANONYMOUS.anonymous and ANONYMOUS.basic_header() is None
    assert "p" not in repr(credentials_from(AuthConfig(username="u", password="p")))


@pytest.mark.parametrize("bad", ["not base64!", base64.b64encode(b"no-colon").decode()])
def test_bad_auth_field_is_an_error(bad: str) -> None:
    with pytest.raises(CredentialsError):
        credentials_from(AuthConfig(auth=bad))


def test_token_request_get_with_basic_or_anonymous() -> None:
    creds = credentials_from(AuthConfig(username="u", password="p"))
    ask = token_request("https://auth.test/token?x=1", "reg", ["repository:a/b:pull"], creds)
    assert ask.method == "GET" and ask.form is None
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(ask.url).query)
    assert query == {"x": ["1"], "service": ["reg"], "scope": ["repository:a/b:pull"]}
    assert ask.headers["Authorization"].startswith("Basic ")
    anonymous = token_request("https://auth.test/token", None, ["s"], ANONYMOUS)
    assert anonymous.headers == {} and anonymous.url == "https://auth.test/token?scope=s"


def test_identity_token_goes_as_an_oauth2_refresh_token_post() -> None:
    creds = credentials_from(AuthConfig(identity_token="refresh-me"))
    ask = token_request("https://auth.test/token", "reg", ["repository:a:pull"], creds)
    assert ask.method == "POST" and ask.headers == {}
    assert ask.form == {
        "grant_type": "refresh_token",
        "refresh_token": "refresh-me",
        "client_id": "peermirror",
        "service": "reg",
        "scope": "repository:a:pull",
    }


def test_token_response_fields() -> None:
    assert parse_token_response({"token": "t", "expires_in": 300}, 10.0) == Token("t", 310.0)
    assert parse_token_response({"access_token": "a"}, 0.0) == Token("a", DEFAULT_EXPIRES_IN)
    assert parse_token_response({"token": "t", "expires_in": "x"}, 0.0).expires_at == 60.0
    bad: object
    for bad in ([], {"token": ""}, {"expires_in": 3}, {"token": 5}):
        with pytest.raises(TokenResponseError):
            parse_token_response(bad, 0.0)


def test_token_cache_per_host_and_scope_until_expiry() -> None:
    cache = TokenCache()
    cache.put("r.test", "repository:a:pull", Token("A", 100.0), now=0.0)
    cache.put("r.test", "repository:b:pull", Token("B", 100.0), now=0.0)
    assert cache.get("r.test", "repository:a:pull", now=50.0) == "A"
    assert cache.get("r.test", "repository:b:pull", now=50.0) == "B"
    assert cache.get("other.test", "repository:a:pull", now=50.0) is None
    assert cache.get("r.test", "repository:a:pull", now=100.0 - EXPIRY_MARGIN) is None
    assert len(cache) == 1
    cache.drop("r.test", "repository:b:pull", "an older token")
    assert cache.get("r.test", "repository:b:pull", now=1.0) == "B"
    cache.drop("r.test", "repository:b:pull", "B")
    assert cache.get("r.test", "repository:b:pull", now=1.0) is None


def test_token_cache_refuses_stale_tokens_and_stays_bounded() -> None:
    cache = TokenCache(max_entries=2)
    cache.put("h", "s", Token("x", EXPIRY_MARGIN), now=0.0)
    assert len(cache) == 0
    for i, expiry in enumerate((300.0, 100.0, 200.0)):
        cache.put("h", f"s{i}", Token(str(i), expiry), now=0.0)
    assert len(cache) == 2
    assert cache.get("h", "s1", now=0.0) is None  # the soonest to expire went first
