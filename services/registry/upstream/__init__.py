"""Upstream registry access for the in-flight spool: containerd's endpoints, TLS, auth and limits.

The API the registry's fetch coordinator calls (nothing else in the request path uses it yet)::

    client = UpstreamClient(lambda: registries, UpstreamSettings.from_config(cfg), metrics)
    try:
        body = await client.fetch_blob("docker.io", "library/alpine", digest, offset=0)
    except (UpstreamAuthError, UpstreamBusy, UpstreamNotFound):
        ...  # answer containerd a fast 404: it pulls from upstream itself
    except UpstreamUnavailable:
        ...  # no endpoint answered: 404 as well, or retry later
    async with body:
        async for chunk in body.chunks():  # starts at `offset`; paced under the bandwidth cap
            ...
    manifest = await client.fetch_manifest("docker.io", "library/alpine", "3.19", head=True)

Bodies are not verified here: the caller hashes blob bytes against their digest, as for peers.
"""

from __future__ import annotations

from services.registry.upstream.body import UpstreamBody
from services.registry.upstream.client import MANIFEST_ACCEPT, UpstreamClient, UpstreamSettings
from services.registry.upstream.errors import (
    UpstreamAuthError,
    UpstreamBusy,
    UpstreamError,
    UpstreamNotFound,
    UpstreamUnavailable,
)
from services.registry.upstream.metrics import UpstreamMetrics
from services.registry.upstream.routes import UpstreamRoute, routes_for

__all__ = [
    "MANIFEST_ACCEPT",
    "UpstreamAuthError",
    "UpstreamBody",
    "UpstreamBusy",
    "UpstreamClient",
    "UpstreamError",
    "UpstreamMetrics",
    "UpstreamNotFound",
    "UpstreamRoute",
    "UpstreamSettings",
    "UpstreamUnavailable",
    "routes_for",
]
