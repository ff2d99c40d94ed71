"""Credentials for an endpoint from `configs.<host>.auth`, and the requests that carry them."""

from __future__ import annotations

import base64
import binascii
import urllib.parse
from dataclasses import dataclass, field

from services.common.errors import InvalidArgumentError
from services.common.k3s.registries import AuthConfig

# What the token endpoint is told the client is (OAuth2 `client_id`, required with a POST).
CLIENT_ID = "peermirror"


class CredentialsError(InvalidArgumentError):
    """`configs.<host>.auth` cannot be used (e.g. `auth` is not base64 of `user:password`)."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """What this node may present to one registry host; all None = anonymous."""

    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    identity_token: str | None = field(default=None, repr=False)

    @property
    def anonymous(self) -> bool:
        return self.username is None and self.identity_token is None

    def basic_header(self) -> str | None:
        """`Authorization: Basic ...` for username/password, None without them."""
        if self.username is None:
            return None
        raw = f"{self.username}:{self.password or ''}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


ANONYMOUS = Credentials()


def credentials_from(auth: AuthConfig | None) -> Credentials:
    """K3s/containerd semantics: `auth` (base64 `user:password`) when username is not given,
    `identity_token` as an OAuth2 refresh token."""
    if auth is None:
        return ANONYMOUS
    username, password = auth.username, auth.password
    if username is None and auth.auth:
        try:
            decoded = base64.b64decode(auth.auth, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise CredentialsError("auth is not base64 of 'user:password'") from exc
        user, sep, secret = decoded.partition(":")
        if not sep:
            raise CredentialsError("auth does not decode to 'user:password'")
        username, password = user, secret
    return Credentials(username or None, password, auth.identity_token or None)


@dataclass(frozen=True, slots=True)
class TokenRequest:
    """How to ask a Bearer realm for a token: GET with query, or an OAuth2 form POST."""

    method: str
    url: str
    headers: dict[str, str]
    form: dict[str, str] | None = None


def token_request(
    realm: str, service: str | None, scopes: list[str], creds: Credentials
) -> TokenRequest:
    """The distribution token flow: a refresh token is POSTed (OAuth2), otherwise GET with
    HTTP basic (or anonymous) and `service` and `scope` in the query."""
    if creds.identity_token is not None:
        form = {
            "grant_type": "refresh_token",
            "refresh_token": creds.identity_token,
            "client_id": CLIENT_ID,
        }
        if service:
            form["service"] = service
        if scopes:
            form["scope"] = " ".join(scopes)
        return TokenRequest("POST", realm, {}, form)
    query: list[tuple[str, str]] = []
    if service:
        query.append(("service", service))
    query.extend(("scope", scope) for scope in scopes)
    url = realm
    if query:
        url += ("&" if urllib.parse.urlsplit(realm).query else "?") + urllib.parse.urlencode(query)
    headers: dict[str, str] = {}
    basic = creds.basic_header()
    if basic is not None:
        headers["Authorization"] = basic
    return TokenRequest("GET", url, headers)
