"""The registry's liveness and readiness endpoints, as probed by kubelet and the tests."""

from __future__ import annotations

from types import SimpleNamespace

from sanic import Blueprint, HTTPResponse, Request
from sanic.response import json

from services.registry.context import RegistryApp

health = Blueprint("health")


@health.get("/livez")
async def livez(request: Request[RegistryApp, SimpleNamespace]) -> HTTPResponse:
    """200 while the process runs its event loop: answering at all is the liveness signal."""
    return json({"status": "ok"})


@health.get("/readyz")
async def readyz(request: Request[RegistryApp, SimpleNamespace]) -> HTTPResponse:
    """200 once the registry finished starting and until it begins to stop; 503 otherwise."""
    ready = request.app.ctx.ready
    return json({"status": "ready" if ready else "not ready"}, status=200 if ready else 503)
