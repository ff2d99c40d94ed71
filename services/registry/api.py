"""The /v2/ OCI Distribution pull endpoints: thin Sanic handlers over paths, policy and content.

Repository names contain slashes, so every /v2/ request goes through one catch-all route. The
handlers answer or raise; the edge (:mod:`services.registry.edge`) renders every error as an
OCI error body with a 4xx status, binds the request id and counts and logs each request once.
"""

from __future__ import annotations

import enum
from types import SimpleNamespace
from urllib.parse import unquote

from sanic import Blueprint, HTTPResponse, Request
from sanic.exceptions import RequestCancelled

from services.common.oci.errors import CONTENT_TYPE, ErrorCode, OciError
from services.common.store.protocol import ContentNotFoundError
from services.registry.cache import Manifest
from services.registry.content import store_failed
from services.registry.context import RegistryApp
from services.registry.edge import note_failure
from services.registry.error_answers import ALLOWED_METHODS, RefusedError
from services.registry.headers import (
    API_VERSION,
    API_VERSION_HEADER,
    PEER_HEADER,
    RangeNotSatisfiableError,
    blob_answer,
    is_peer_request,
    manifest_headers,
)
from services.registry.inflight.serving import (
    answer_local_miss,
    answer_peer,
    request_on_this_host,
)
from services.registry.paths import Kind, Route, parse_v2_path
from services.registry.transfer import ClientGoneError, send_blob

v2 = Blueprint("v2")

AppRequest = Request[RegistryApp, SimpleNamespace]


class Scope(enum.Enum):
    """Where a request may be answered from."""

    # Requests from peers: this node's own content only, so a relay is never relayed again.
    LOCAL_ONLY = "local_only"
    # Requests from local clients (containerd): local content, then peers once relaying exists.
    LOCAL_THEN_PEERS = "local_then_peers"


async def _on_local_miss(
    request: AppRequest, route: Route, registry: str, key: str, error: OciError, scope: Scope
) -> HTTPResponse | None:
    """Decide what a local miss becomes: for LOCAL_THEN_PEERS the mirror path's answer, then
    (for clients on this host) the cluster's one upstream fetch, or a 404; peer requests
    (LOCAL_ONLY) get an in-flight spool or manifest window, else a refusal, so a relay is
    one hop."""
    mirror = request.app.ctx.mirror
    inflight = request.app.ctx.inflight
    if scope is Scope.LOCAL_ONLY and inflight is not None:
        answered = await answer_peer(request, route, registry, key, inflight)
        if answered is not None:
            return answered.response

    # The relay extends the error it is given; a waiter relays again, from the original.
    original = (error.message, error.detail, error.status, error.args)

    async def relay() -> HTTPResponse | None:
        assert mirror is not None
        error.message, error.detail, error.status, error.args = original
        # Each relay holds peer connections and buffers: one client gets a bounded share.
        with request.app.ctx.relay_slots.hold(request.ip):
            response = await mirror.relay(
                request, route, registry, key, error, request.app.ctx.stats
            )
        request.ctx.served_by_peer = True
        return response

    if scope is Scope.LOCAL_THEN_PEERS and inflight is not None and request_on_this_host(request):
        miss = error
        try:
            if mirror is not None:
                return await relay()
        except RangeNotSatisfiableError:
            raise  # the client's range, not a miss: no upstream fetch changes that
        except OciError as relay_miss:
            miss = relay_miss
        # No peer holds it: the cluster's one upstream fetch (ours or another node's).
        return await answer_local_miss(
            request, route, registry, key, inflight, miss, relay if mirror else None
        )
    if scope is Scope.LOCAL_THEN_PEERS and mirror is not None:
        return await relay()
    if scope is Scope.LOCAL_ONLY and not store_failed(error):
        raise RefusedError.of(
            error, f"{error.message}; peer requests are served from local content only"
        )
    raise error


async def base(request: AppRequest) -> HTTPResponse:
    """API version check: 200 with an empty JSON object for GET and HEAD."""
    return HTTPResponse(b"{}", headers={API_VERSION_HEADER: API_VERSION}, content_type=CONTENT_TYPE)


async def content(request: AppRequest, path: str) -> HTTPResponse | None:
    """Manifests and blobs: parse, apply policy, look up, answer."""
    # Percent-escapes are decoded, so `sha256%3A...` is the digest and `library%2Falpine` the
    # name, as the reference registry reads them: clients escape path segments differently.
    # (Sanic leaves a catch-all parameter raw even with the route's unquote option.)
    route = parse_v2_path(unquote(path))
    request.ctx.route = route
    if route.kind is Kind.BASE:
        return await base(request)
    from_peer = is_peer_request(request.headers.get(PEER_HEADER))
    scope = Scope.LOCAL_ONLY if from_peer else Scope.LOCAL_THEN_PEERS
    try:
        if route.kind is Kind.MANIFEST:
            return await _manifest(request, route, scope)
        return await _blob(request, route, scope)
    except Exception as exc:
        if not request.responded and not isinstance(exc, ClientGoneError):
            raise  # the edge answers it
        # The answer had begun, so no error answer can follow: the edge logs why it was cut,
        # and a cancelled request ends quietly, its connection closed short of the body
        # (Sanic would log a traceback and two errors for anything else).
        note_failure(request, exc)
        raise RequestCancelled() from exc


def _policy_target_or_refuse(request: AppRequest, route: Route) -> tuple[str, str]:
    """(registry, normalised name) the request may be served for; RefusedError otherwise."""
    policy = request.app.ctx.policy
    try:
        target = policy.check(request.args.get("ns"), route.name, route.tag)
    except OciError as error:
        if error.status == 404:
            raise RefusedError.of(error) from None
        raise
    request.ctx.registry = target.registry
    return target.registry, target.store_key(route.tag) if route.tag is not None else target.name


async def _manifest(request: AppRequest, route: Route, scope: Scope) -> HTTPResponse | None:
    service = request.app.ctx.content
    registry, key = _policy_target_or_refuse(request, route)
    try:
        if route.tag is not None:
            target = await service.resolve_tag(key)
            manifest: Manifest = await service.manifest(target.digest, target.media_type)
        else:
            assert route.digest is not None
            manifest = await service.manifest(route.digest)
    except OciError as error:
        return await _on_local_miss(request, route, registry, key, error, scope)
    headers = manifest_headers(manifest.digest, manifest.size, manifest.media_type, registry)
    if request.method == "HEAD":
        return HTTPResponse(b"", headers=headers)
    request.app.ctx.stats.bytes_served_local += manifest.size
    request.ctx.bytes_sent = manifest.size
    content_type = headers.pop("Content-Type")
    return HTTPResponse(manifest.body, headers=headers, content_type=content_type)


async def _blob(request: AppRequest, route: Route, scope: Scope) -> HTTPResponse | None:
    ctx = request.app.ctx
    registry, key = _policy_target_or_refuse(request, route)
    assert route.digest is not None
    try:
        blob = await ctx.content.blob(route.digest)
    except OciError as error:
        return await _on_local_miss(request, route, registry, key, error, scope)
    answer = blob_answer(request.headers.get("range"), blob.digest, blob.size, registry)
    if request.method == "HEAD":
        return HTTPResponse(b"", status=answer.status, headers=answer.headers)
    store = ctx.content.keeper.store
    assert store is not None
    try:
        sent = await send_blob(request, answer, store, blob)
    except ContentNotFoundError:
        # Deleted between lookup and first read: nothing was sent yet, so a clean 404 goes out.
        raise OciError(
            ErrorCode.BLOB_UNKNOWN, f"blob {blob.digest} was just removed from this node"
        ) from None
    ctx.stats.bytes_served_local += sent
    request.ctx.bytes_sent = sent
    return None


v2.add_route(base, "/v2", methods=ALLOWED_METHODS, name="v2_base")
v2.add_route(content, "/v2/<path:path>", methods=ALLOWED_METHODS, name="v2_content")


def install(app: RegistryApp) -> None:
    """Add the /v2/ endpoints to `app`."""
    app.blueprint(v2)
