"""The registry's liveness and readiness endpoints, as probed by kubelet and the tests."""

from __future__ import annotations

from types import SimpleNamespace

from sanic import Blueprint, HTTPResponse, Request
from sanic.response import json

from services.registry.context import RegistryApp

health = Blueprint("health")


async def livez(request: Request[RegistryApp, SimpleNamespace]) -> HTTPResponse:
    """200 while the process runs its event loop: answering at all is the liveness signal."""
    return json({"status": "ok"})


async def readyz(request: Request[RegistryApp, SimpleNamespace]) -> HTTPResponse:
    """200 once the registry finished starting and until it begins to stop; 503 otherwise."""
    ready = request.app.ctx.ready
    return json({"status": "ready" if ready else "not ready"}, status=200 if ready else 503)


# HEAD too: RFC 9110 requires it of every GET resource (and `curl -I` probes with it).
health.add_route(livez, "/livez", methods=["GET", "HEAD"])
health.add_route(readyz, "/readyz", methods=["GET", "HEAD"])
