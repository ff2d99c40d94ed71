"""Which endpoints containerd tries for a registry, by K3s's rules: one pure function for all users.

The hosts.toml renderer (pinner) writes this list for containerd; the registry's upstream client
fetches from exactly the same list, so peermirror never reaches an endpoint containerd would not.

K3s rules (shared/REFERENCE.md §2): an endpoint without a scheme is https, except a loopback
host on a port other than 443, which is http; `docker.io` means `registry-1.docker.io`; the
paths "", "/" and "/v2" all mean "/v2", any other path is used as given (`override_path`);
duplicates (same host and path, whatever the scheme) are dropped, the first kept; the mirror
endpoints come first, in file order, and carry the registry's rewrites; the default endpoint
(the registry itself, never rewritten) is tried last unless `disable-default-registry-endpoint`;
a listed endpoint that is the default endpoint and comes last is that default endpoint.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from services.common.k3s.registries import (
    WILDCARD,
    EndpointURL,
    RegistryConfig,
    parse_endpoint,
)
from services.common.oci.grammar import DOCKER_HUB

DOCKER_HUB_ENDPOINT_HOST = "registry-1.docker.io"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An endpoint after K3s normalisation; `written` is its host[:port] as the user wrote it."""

    scheme: str
    hostport: str
    path: str
    override_path: bool
    written: str

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.hostport}{self.path}"

    def same_place(self, other: Endpoint) -> bool:
        """Same host and path, whatever the scheme (an http registry stays http)."""
        return self.hostport == other.hostport and self.path == other.path


@dataclass(frozen=True, slots=True)
class EndpointList:
    """What containerd tries for one registry, in order: `mirrors`, then `server`.

    `server` is the default endpoint; None when it is disabled or not known (`"*"` without an
    image, where containerd uses the image's own registry).
    """

    mirrors: tuple[Endpoint, ...]
    server: Endpoint | None


def is_localhost(hostport: str) -> bool:
    """containerd's rule: `localhost` or a loopback IP, with or without a port."""
    host = hostport
    if host.startswith("["):
        host = host[1 : host.find("]")]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def normalize_endpoint(
    ep: EndpointURL, *, mirror_hostport: str | None = None, mirror_tls: bool = True
) -> Endpoint:
    """Apply K3s's endpoint rules: default scheme, Docker Hub host, `/v2` path, override_path.

    `mirror_hostport` is the embedded registry's address, which keeps its own scheme.
    """
    port = ep.port
    scheme = ep.scheme
    if scheme is None:
        # Local registries on odd ports are plain http; the embedded mirror keeps its scheme.
        if mirror_hostport is not None and ep.hostport == mirror_hostport:
            scheme = "https" if mirror_tls else "http"
        elif is_localhost(ep.hostport) and port not in (None, 443):
            scheme = "http"
        else:
            scheme = "https"
    # A port equal to the scheme's default names the same endpoint as no port.
    if (scheme, port) in (("https", 443), ("http", 80)):
        port = None
    host = ep.host
    if host == DOCKER_HUB and port is None:
        host = DOCKER_HUB_ENDPOINT_HOST
    hostport = host if port is None else f"{host}:{port}"
    path = ep.path.rstrip("/")
    if path in ("", "/v2"):
        return Endpoint(scheme, hostport, "/v2", False, ep.hostport)
    return Endpoint(scheme, hostport, path, True, ep.hostport)


def default_endpoint(
    registry: str, *, mirror_hostport: str | None = None, mirror_tls: bool = True
) -> Endpoint | None:
    """The registry's own endpoint (None for `"*"`: containerd uses the image's registry)."""
    if registry == WILDCARD:
        return None
    return normalize_endpoint(
        parse_endpoint(registry, "registries", registry),
        mirror_hostport=mirror_hostport,
        mirror_tls=mirror_tls,
    )


def config_for(configs: Mapping[str, RegistryConfig], ep: Endpoint) -> RegistryConfig | None:
    """`configs[<endpoint host>]` (as written, then normalised; Docker Hub under either name)."""
    names = [ep.written, ep.hostport]
    if DOCKER_HUB_ENDPOINT_HOST in names:
        names.append(DOCKER_HUB)
    for name in names:
        cfg = configs.get(name)
        if cfg is not None:
            return cfg
    return None


def endpoint_list(
    listed: Sequence[Endpoint], default: Endpoint | None, *, disable_default: bool
) -> EndpointList:
    """The endpoints containerd tries: `listed` (normalised, in order) deduplicated, then the
    default endpoint unless `disable_default`."""
    seen: set[str] = set()
    unique: list[Endpoint] = []
    for ep in listed:
        # Scheme-insensitive: the same host and path twice would be tried twice.
        key = f"{ep.hostport}{ep.path}"
        if key not in seen:
            seen.add(key)
            unique.append(ep)
    server = default
    if unique and default is not None and unique[-1].same_place(default):
        # The registry itself listed last: it is the default endpoint, in the scheme written.
        server = replace(default, scheme=unique.pop().scheme)
    if disable_default:
        server = None
    return EndpointList(tuple(unique), server)
