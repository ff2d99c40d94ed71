"""The /v2/ OCI Distribution pull endpoints: thin Sanic handlers over paths, policy and content.

Every /v2/ request goes through one catch-all route (repository names contain slashes) and one
error path (:func:`error_response`), so each failure is an OCI error body with a 4xx status and no
``WWW-Authenticate`` challenge, and is counted once in the stats.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Sequence
from types import SimpleNamespace
from urllib.parse import unquote

import structlog
from sanic import Blueprint, HTTPResponse, Request
from sanic.exceptions import MethodNotAllowed, RequestCancelled

from services.common.errors import PeermirrorError
from services.common.logsetup import get_logger
from services.common.oci.errors import CONTENT_TYPE, ErrorCode, OciError
from services.common.request_id import HTTP_HEADER as REQUEST_ID_HEADER
from services.common.request_id import LOG_KEY as REQUEST_ID_KEY
from services.common.request_id import accept_request_id
from services.common.store.protocol import ContentNotFoundError
from services.registry.cache import Manifest
from services.registry.content import store_failed
from services.registry.context import RegistryApp
from services.registry.headers import (
    API_VERSION,
    API_VERSION_HEADER,
    PEER_HEADER,
    RangeNotSatisfiableError,
    blob_headers,
    is_peer_request,
    manifest_headers,
    select_range,
)
from services.registry.inflight.serving import (
    answer_local_miss,
    answer_peer,
    request_on_this_host,
)
from services.registry.limits import limit_log
from services.registry.metrics import log_request
from services.registry.paths import Kind, Route, kind_hint, parse_v2_path
from services.registry.stats import PullRecord, RequestKind, Result
from services.registry.transfer import ClientGoneError, send_blob

ALLOWED_METHODS = ("GET", "HEAD")
# Every method is routed here so that the 405 carries an OCI body; Sanic answers the rest.
ROUTED_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

log = get_logger("registry.api")

v2 = Blueprint("v2")

AppRequest = Request[RegistryApp, SimpleNamespace]

_KINDS: dict[Kind | None, RequestKind] = {
    Kind.MANIFEST: RequestKind.MANIFEST,
    Kind.BLOB: RequestKind.BLOB,
}


class Scope(enum.Enum):
    """Where a request may be answered from."""

    # Requests from peers: this node's own content only, so a relay is never relayed again.
    LOCAL_ONLY = "local_only"
    # Requests from local clients (containerd): local content, then peers once relaying exists.
    LOCAL_THEN_PEERS = "local_then_peers"


class _Refused(PeermirrorError):
    """A policy refusal or a peer request this node cannot answer locally (REFUSED)."""

    def __init__(self, error: OciError) -> None:
        super().__init__(str(error))
        self.error = error


def error_response(error: OciError, headers: dict[str, str] | None = None) -> HTTPResponse:
    """The one rendering of an OCI error as an HTTP answer."""
    return HTTPResponse(
        error.body(),
        status=error.status,
        headers={API_VERSION_HEADER: API_VERSION, **(headers or {})},
        content_type=CONTENT_TYPE,
    )


def _result_of(error: OciError) -> Result:
    if store_failed(error):
        return Result.ERROR
    if error.status == 404:
        return Result.NOT_FOUND
    return Result.CLIENT_ERROR


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
        except OciError as relay_miss:
            miss = relay_miss
        # No peer holds it: the cluster's one upstream fetch (ours or another node's).
        return await answer_local_miss(
            request, route, registry, key, inflight, miss, relay if mirror else None
        )
    if scope is Scope.LOCAL_THEN_PEERS and mirror is not None:
        return await relay()
    if scope is Scope.LOCAL_ONLY and not store_failed(error):
        raise _Refused(
            OciError(
                error.code,
                f"{error.message}; peer requests are served from local content only",
                detail=error.detail,
                status=404,
            )
        )
    raise error


def _base_response(method: str) -> HTTPResponse:
    if method not in ALLOWED_METHODS:
        return _method_refused(method)
    return HTTPResponse(b"{}", headers={API_VERSION_HEADER: API_VERSION}, content_type=CONTENT_TYPE)


async def base(request: AppRequest) -> HTTPResponse:
    """API version check: 200 with an empty JSON object for GET and HEAD."""
    too_long = _too_long(request)
    if too_long is not None:
        return error_response(too_long)
    return _base_response(request.method)


def _too_long(request: AppRequest) -> OciError | None:
    """The 414 for a path or query past the configured bounds (logged once per client)."""
    error = request.app.ctx.limits.check(request.path, request.query_string)
    if error is not None:
        limit_log.refused("max_uri_bytes", request.ip, "client refused: request URI too long")
    return error


def _method_refused(method: str, allowed: Sequence[str] = ALLOWED_METHODS) -> HTTPResponse:
    """The 405 for `method`: OCI body, and the ``Allow`` header RFC 9110 requires on a 405."""
    error = OciError(
        ErrorCode.UNSUPPORTED,
        f"method {method} not supported: this registry is read-only "
        f"({' and '.join(allowed)} only here)",
        detail={"method": method},
    )
    return error_response(error, {"Allow": ", ".join(allowed)})


async def content(request: AppRequest, path: str) -> HTTPResponse | None:
    """Manifests and blobs: parse, apply policy, look up, answer; count the outcome."""
    # Percent-escapes are decoded, so `sha256%3A...` is the digest and `library%2Falpine` the
    # name, as the reference registry reads them: clients escape path segments differently.
    # (Sanic leaves a catch-all parameter raw even with the route's unquote option.)
    path = unquote(path)
    ctx = request.app.ctx
    stats = ctx.stats
    from_peer = is_peer_request(request.headers.get(PEER_HEADER))
    kind = _KINDS.get(kind_hint(path), RequestKind.OTHER)
    result = Result.CLIENT_ERROR
    error_text: str | None = None
    started = time.monotonic()
    # Every line logged while answering (and the lookup and peer requests made for it) carries
    # the id, so one pull can be followed across nodes.
    request.ctx.request_id = accept_request_id(request.headers.get(REQUEST_ID_HEADER))
    tokens = structlog.contextvars.bind_contextvars(**{REQUEST_ID_KEY: request.ctx.request_id})
    stats.begin()
    try:
        too_long = _too_long(request)
        if too_long is not None:
            raise too_long
        if request.method not in ALLOWED_METHODS:
            return _method_refused(request.method)
        route = parse_v2_path(path)
        request.ctx.route = route
        if route.kind is Kind.BASE:
            result = Result.LOCAL_HIT
            return _base_response(request.method)
        scope = Scope.LOCAL_ONLY if from_peer else Scope.LOCAL_THEN_PEERS
        try:
            response: HTTPResponse | None
            if route.kind is Kind.MANIFEST:
                response = await _manifest(request, route, scope)
            else:
                response = await _blob(request, route, scope)
        except _Refused as refused:
            result = Result.REFUSED
            error_text = refused.error.message
            return error_response(refused.error)
        result = (
            Result.PEER_HIT if getattr(request.ctx, "served_by_peer", False) else Result.LOCAL_HIT
        )
        return response
    except RangeNotSatisfiableError as unsatisfiable:
        result = Result.CLIENT_ERROR
        error_text = unsatisfiable.error.message
        return error_response(unsatisfiable.error, unsatisfiable.headers)
    except ClientGoneError as gone:
        result = Result.ERROR
        error_text = str(gone)
        log.info("client disconnected mid-body", path=path, error=str(gone))
        # Sanic treats a cancelled request quietly: nothing more is sent, the connection closes.
        raise RequestCancelled() from gone
    except asyncio.CancelledError:
        # Sanic cancels a handler whose client went away (or the server is stopping).
        result = Result.ERROR
        error_text = "cancelled"
        raise
    except OciError as error:
        result = _result_of(error)
        error_text = error.message
        return error_response(error)
    finally:
        stats.end(kind, result, from_peer)
        _finish(request, path, kind, result, from_peer, time.monotonic() - started, error_text)
        structlog.contextvars.reset_contextvars(**tokens)


def _finish(
    request: AppRequest,
    path: str,
    kind: RequestKind,
    result: Result,
    from_peer: bool,
    seconds: float,
    error: str | None,
) -> None:
    """Count and log one finished request. The registry label is the one policy accepted
    (a bounded set); a refused or unparsable request gets none."""
    registry: str = getattr(request.ctx, "registry", "")
    metrics = request.app.ctx.metrics
    if metrics is not None:
        metrics.request_done(registry, kind, result, from_peer)
    if kind is not RequestKind.OTHER:
        request.app.ctx.stats.record_pull(
            _pull_record(request, registry, kind, result, from_peer, seconds)
        )
    log_request(
        method=request.method,
        path=f"/v2/{path}",
        registry=registry,
        kind=kind,
        result=result,
        from_peer=from_peer,
        seconds=seconds,
        error=error,
    )


def _pull_record(
    request: AppRequest,
    registry: str,
    kind: RequestKind,
    result: Result,
    from_peer: bool,
    seconds: float,
) -> PullRecord:
    """What the status page shows of one finished request: the reference asked for and where
    its bytes came from (this node's store, or the peer the relay took them from)."""
    route: Route | None = getattr(request.ctx, "route", None)
    if route is None:
        ref = ""
    else:
        name = f"{registry}/{route.name}" if registry else route.name
        ref = f"{name}@{route.digest}" if route.digest is not None else f"{name}:{route.tag}"
    if result is Result.PEER_HIT:
        source = str(getattr(request.ctx, "peer", "peer"))
    elif result is Result.LOCAL_HIT:
        source = "local"
    else:
        source = ""
    return PullRecord(
        at=time.time(),
        ref=ref,
        kind=kind,
        result=result,
        from_peer=from_peer,
        source=source,
        bytes=int(getattr(request.ctx, "bytes_sent", 0)),
        seconds=seconds,
    )


def _policy_target_or_refuse(request: AppRequest, route: Route) -> tuple[str, str]:
    """(registry, normalised name) the request may be served for; _Refused otherwise."""
    policy = request.app.ctx.policy
    try:
        target = policy.check(request.args.get("ns"), route.name, route.tag)
    except OciError as error:
        if error.status == 404:
            raise _Refused(error) from None
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
    byte_range = select_range(request.headers.get("range"), blob.size, registry)
    headers = blob_headers(blob.digest, blob.size, registry, byte_range)
    status = 200 if byte_range is None else 206
    if request.method == "HEAD":
        return HTTPResponse(b"", status=status, headers=headers)
    offset, count = (0, blob.size) if byte_range is None else (byte_range.start, byte_range.length)
    store = ctx.content.keeper.store
    assert store is not None
    try:
        sent = await send_blob(request, status, headers, store, blob, offset, count)
    except ContentNotFoundError:
        # Deleted between lookup and first read: nothing was sent yet, so a clean 404 goes out.
        raise OciError(
            ErrorCode.BLOB_UNKNOWN, f"blob {blob.digest} was just removed from this node"
        ) from None
    ctx.stats.bytes_served_local += sent
    request.ctx.bytes_sent = sent
    return None


def method_not_allowed(request: AppRequest, exception: Exception) -> HTTPResponse:
    """Sanic's own 405s (methods no route lists) get the OCI body too, and an ``Allow`` header
    naming the methods the path does take."""
    routed = getattr(exception, "allowed_methods", None) or ALLOWED_METHODS
    # The /v2 routes list every method only to refuse them with an OCI body.
    allowed = sorted(m for m in routed if m in ALLOWED_METHODS or m not in ROUTED_METHODS)
    return _method_refused(request.method, allowed)


v2.add_route(base, "/v2", methods=ROUTED_METHODS, name="v2_base")
v2.add_route(content, "/v2/<path:path>", methods=ROUTED_METHODS, name="v2_content")


def install(app: RegistryApp) -> None:
    """Add the /v2/ endpoints and their error rendering to `app`."""
    app.blueprint(v2)
    app.error_handler.add(MethodNotAllowed, method_not_allowed)
