"""Where this node may fetch a registry's content: containerd's endpoints, rewrites, TLS, auth.

Pure: from a parsed registries.yaml and the registry named in a request to the ordered list of
:class:`UpstreamRoute` objects, each knowing its URL base, its repository rewrites, its TLS
settings and its credentials. The endpoint list itself is
:func:`services.common.k3s.endpoints.endpoint_list`, the same one the pinner writes into
containerd's hosts.toml, so peermirror never contacts a host containerd would not. The
embedded mirror (this node's own registry) is never a route.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from services.common.k3s.endpoints import (
    Endpoint,
    config_for,
    default_endpoint,
    endpoint_list,
    normalize_endpoint,
)
from services.common.k3s.registries import WILDCARD, AuthConfig, Registries, TLSConfig

# Go's regexp.Expand: `$name`, `${name}`, `$$`; a name is the longest run of word characters.
_GO_TEMPLATE = re.compile(r"\$(?:\$|\{(?P<braced>[A-Za-z0-9_]+)\}|(?P<bare>[A-Za-z0-9_]+))")


@dataclass(frozen=True, slots=True)
class UpstreamRoute:
    """One endpoint containerd would try for a registry, with what a request to it needs."""

    endpoint: Endpoint
    # Rewrites apply to mirrors only; the default endpoint is asked for the repository as is.
    rewrites: tuple[tuple[str, str], ...]
    tls: TLSConfig | None
    auth: AuthConfig | None
    is_default: bool
    # The registry named in the request; containerd tells mirrors with `?ns=<registry>`.
    registry: str

    @property
    def host(self) -> str:
        return self.endpoint.hostport

    def repository(self, repository: str) -> str:
        """The repository this endpoint is asked for (K3s rewrites applied)."""
        return rewrite_repository(repository, self.rewrites)

    def url(self, repository: str, kind: str, reference: str) -> str:
        """`<endpoint>/<repository>/<kind>/<reference>`, with `ns` for a mirror."""
        path = f"{self.endpoint.path}/{self.repository(repository)}/{kind}/{reference}"
        url = f"{self.endpoint.scheme}://{self.endpoint.hostport}{path}"
        if not self.is_default:
            url += "?" + urllib.parse.urlencode({"ns": self.registry})
        return url


def go_expand(template: str, match: re.Match[str]) -> str:
    """Go's `Regexp.Expand` for one match: unknown groups expand to nothing, as in Go."""

    def group(m: re.Match[str]) -> str:
        name = m.group("braced") or m.group("bare")
        if name is None:
            return "$"
        try:
            value = match.group(int(name) if name.isdigit() else name)
        except IndexError:  # unknown group name or number
            return ""
        return value or ""

    return _GO_TEMPLATE.sub(group, template)


def _expander(template: str) -> Callable[[re.Match[str]], str]:
    return lambda match: go_expand(template, match)


def rewrite_repository(repository: str, rewrites: Iterable[tuple[str, str]]) -> str:
    """K3s's containerd: the first rewrite (file order) whose regex changes the name wins; the
    replacement uses Go's `$1` / `${name}` syntax and replaces every match."""
    for pattern, replacement in rewrites:
        rewritten = re.compile(pattern).sub(_expander(replacement), repository)
        if rewritten != repository:
            return rewritten
    return repository


def routes_for(
    registries: Registries,
    registry: str,
    *,
    disable_default: bool,
    own_hosts: Iterable[str] = (),
) -> tuple[UpstreamRoute, ...]:
    """The routes for `registry`, in containerd's order; `own_hosts` are this node's registry
    addresses (host:port), never used as upstream endpoints."""
    registry = registry.lower()
    mirror = registries.mirrors.get(registry) or registries.mirrors.get(WILDCARD)
    listed = [normalize_endpoint(ep) for ep in mirror.endpoints] if mirror else []
    default = default_endpoint(registry)
    plan = endpoint_list(listed, default, disable_default=disable_default)
    own = {h.lower() for h in own_hosts}
    rewrites = mirror.rewrites if mirror else ()
    routes: list[UpstreamRoute] = []
    for ep in plan.mirrors:
        if ep.hostport in own or ep.written in own:
            continue
        routes.append(_route(registries, ep, rewrites, registry, is_default=False))
    if plan.server is not None and plan.server.hostport not in own:
        routes.append(_route(registries, plan.server, (), registry, is_default=True))
    return tuple(routes)


def _route(
    registries: Registries,
    ep: Endpoint,
    rewrites: tuple[tuple[str, str], ...],
    registry: str,
    *,
    is_default: bool,
) -> UpstreamRoute:
    cfg = config_for(registries.configs, ep)
    tls = cfg.tls if cfg is not None and ep.scheme == "https" else None
    return UpstreamRoute(
        endpoint=ep,
        rewrites=rewrites,
        tls=tls,
        auth=cfg.auth if cfg is not None else None,
        is_default=is_default,
        registry=registry,
    )
