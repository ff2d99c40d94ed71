"""The registry's HTTP edge: one error handler and the middleware every request passes through.

Handlers answer or raise; this module does the rest for every request, whichever route (or
Sanic itself, before any route) answers it:

- request middleware accepts the client's ``X-Request-Id`` (or makes one) and binds it to the
  structlog context, so every line logged while answering carries it; response middleware sends
  it back;
- :func:`render_error`, the app's only error handler, turns every exception into an OCI error
  body with a 4xx status: our errors keep theirs, Sanic's refusals (unknown route, method,
  oversized or slow request) get the matching one, and a failure on this node's side (a 5xx
  kind, a bug) is a 404 so containerd falls back at once, its cause kept for the log line;
- once the request is over, its outcome is counted (pull API requests only: the /v2 routes) and
  written as exactly one ``request`` log line. "Over" is a Sanic lifecycle signal, not response
  middleware, which runs when a streamed body has only begun: ``http.lifecycle.response`` after
  the handler is done, ``http.lifecycle.complete`` when the connection closes under a request
  that never finished (the client left, or the handler was cancelled).
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any
from urllib.parse import unquote

import structlog
from sanic import HTTPResponse, Request
from sanic.exceptions import (
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    SanicException,
)
from sanic.models.server_types import ConnInfo

from services.common.errors import PeermirrorError
from services.common.logsetup import get_logger
from services.common.oci.errors import CONTENT_TYPE, ErrorCode, OciError
from services.common.request_id import HTTP_HEADER as REQUEST_ID_HEADER
from services.common.request_id import LOG_KEY as REQUEST_ID_KEY
from services.common.request_id import accept_request_id
from services.registry.content import store_failed
from services.registry.headers import (
    API_VERSION,
    API_VERSION_HEADER,
    PEER_HEADER,
    OciErrorWithHeaders,
    is_peer_request,
)
from services.registry.limits import headers_too_large, limit_log
from services.registry.metrics import source_label
from services.registry.paths import Kind, Route, kind_hint, no_such_endpoint
from services.registry.stats import PullRecord, RequestKind, Result

# The methods the pull API serves; every other one is a 405 naming these.
ALLOWED_METHODS = ("GET", "HEAD")
MAX_REQUEST_BODY_BYTES = 64 * 1024
PULL_API = "/v2"

log = get_logger(__name__)

AnyRequest = Request[Any, SimpleNamespace]

_KINDS: dict[Kind | None, RequestKind] = {
    Kind.MANIFEST: RequestKind.MANIFEST,
    Kind.BLOB: RequestKind.BLOB,
}
# What content this node failed to look up is called, by what was asked for.
_UNKNOWN = {
    RequestKind.MANIFEST: ErrorCode.MANIFEST_UNKNOWN,
    RequestKind.BLOB: ErrorCode.BLOB_UNKNOWN,
    RequestKind.OTHER: ErrorCode.NAME_UNKNOWN,
}
# Codes for refusals that carry only a status (our error kinds, Sanic's exceptions).
_CODES = {
    401: ErrorCode.UNAUTHORIZED,
    403: ErrorCode.DENIED,
    416: ErrorCode.RANGE_INVALID,
    429: ErrorCode.TOOMANYREQUESTS,
}


class RefusedError(OciError):
    """A policy refusal, or a peer request this node cannot answer locally (REFUSED)."""

    @classmethod
    def of(cls, error: OciError, message: str | None = None) -> RefusedError:
        """`error` as a refusal (404, so the client moves on), with `message` if given."""
        return cls(error.code, message or error.message, detail=error.detail, status=404)


@dataclass(slots=True)
class Exchange:
    """One request as the edge follows it, from its head to its end."""

    request_id: str
    tokens: Mapping[str, contextvars.Token[Any]]
    kind: RequestKind
    from_peer: bool
    # Only the pull API is counted; probes, /metrics and the status page are not.
    counted: bool
    started: float = field(default_factory=time.monotonic)
    result: Result | None = None
    error: str | None = None
    exc_info: BaseException | None = None
    status: int | None = None
    done: bool = False


def error_response(error: OciError) -> HTTPResponse:
    """The one rendering of an OCI error as an HTTP answer."""
    extra = error.headers if isinstance(error, OciErrorWithHeaders) else {}
    return HTTPResponse(
        error.body(),
        status=error.status,
        headers={API_VERSION_HEADER: API_VERSION, **extra},
        content_type=CONTENT_TYPE,
    )


def method_refused(method: str, allowed: Sequence[str] = ALLOWED_METHODS) -> OciErrorWithHeaders:
    """The 405 for `method`, with the ``Allow`` header RFC 9110 requires on a 405."""
    return OciErrorWithHeaders(
        ErrorCode.UNSUPPORTED,
        f"method {method} not supported: this registry is read-only "
        f"({' and '.join(allowed)} only here)",
        detail={"method": method},
        headers={"Allow": ", ".join(allowed)},
    )


# --- the request's beginning -----------------------------------------------------------------


def begin(request: AnyRequest) -> Exchange:
    """Request middleware (and the fallback for requests Sanic refused before any middleware):
    the request's id bound to the log context, its count started. Idempotent."""
    exchange: Exchange | None = getattr(request.ctx, "exchange", None)
    if exchange is not None:
        return exchange
    path = request.path
    counted = path == PULL_API or path.startswith(PULL_API + "/")
    request_id = accept_request_id(request.headers.get(REQUEST_ID_HEADER))
    exchange = Exchange(
        request_id=request_id,
        tokens=structlog.contextvars.bind_contextvars(**{REQUEST_ID_KEY: request_id}),
        kind=_KINDS.get(kind_hint(path), RequestKind.OTHER) if counted else RequestKind.OTHER,
        from_peer=is_peer_request(request.headers.get(PEER_HEADER)),
        counted=counted,
    )
    request.ctx.exchange = exchange
    conn: ConnInfo | None = request.conn_info
    if conn is not None:
        conn.ctx.open_request = request
    if counted:
        request.app.ctx.stats.begin()
    return exchange


async def on_request(request: AnyRequest) -> None:
    """Request middleware: follow the request, and refuse a path or query past their bounds
    before any handler spends work on it."""
    begin(request)
    too_long = request.app.ctx.limits.check(request.path, request.query_string)
    if too_long is not None:
        limit_log.refused("max_uri_bytes", _client(request), "client refused: request URI too long")
        raise too_long


async def on_response(request: AnyRequest, response: HTTPResponse) -> None:
    """Response middleware: the id the request is logged with goes back to the client."""
    exchange = begin(request)
    exchange.status = response.status
    response.headers[REQUEST_ID_HEADER] = exchange.request_id


# --- errors ------------------------------------------------------------------------------------


def _limit_refusal(request: AnyRequest, exc: SanicException) -> OciError | None:
    """The answer to a request Sanic cut for a configured limit, its client named in the log at
    most once a minute per limit; None for other exceptions."""
    if isinstance(exc, PayloadTooLarge) and "header" in str(exc).lower():
        # Sanic raises the same exception for an oversized head and an oversized body.
        limit, why = "max_header_bytes", "client refused: headers too large"
        error = headers_too_large(request.app.ctx.cfg.registry.max_header_bytes)
    elif isinstance(exc, PayloadTooLarge):
        limit, why = "max_body_bytes", "client refused: request body too large"
        error = OciError(
            ErrorCode.SIZE_INVALID,
            f"request body exceeds the {MAX_REQUEST_BODY_BYTES} bytes allowed",
            status=413,
        )
    elif isinstance(exc, RequestTimeout):
        limit, why = "request_timeout", "client cut off: request too slow"
        error = OciError(ErrorCode.UNSUPPORTED, "request not received in time", status=408)
    else:
        return None
    limit_log.refused(limit, _client(request), why)
    return error


def _from_sanic(request: AnyRequest, exc: SanicException) -> OciError:
    if isinstance(exc, MethodNotAllowed):
        allowed = getattr(exc, "allowed_methods", None) or ALLOWED_METHODS
        return method_refused(request.method, sorted(allowed))
    if isinstance(exc, NotFound):
        return no_such_endpoint(request.path)
    limited = _limit_refusal(request, exc)
    if limited is not None:
        return limited
    status = exc.status_code
    return OciError(_CODES.get(status, ErrorCode.UNSUPPORTED), str(exc), status=status)


def classify(exc: BaseException, kind: RequestKind) -> tuple[OciError, Result]:
    """What an exception raised while answering a request for `kind` is answered with, and
    how the request counts (pure: the edge's rules, tested without a server)."""
    if isinstance(exc, OciError) and exc.status < 500:
        if isinstance(exc, RefusedError):
            return exc, Result.REFUSED
        if store_failed(exc):
            return exc, Result.ERROR
        return exc, _result_of_status(exc.status)
    status = exc.http_status if isinstance(exc, PeermirrorError) else 500
    if status < 500:
        code = _UNKNOWN[kind] if status == 404 else _CODES.get(status, ErrorCode.UNSUPPORTED)
        return OciError(code, str(exc), status=status), _result_of_status(status)
    # This node's side failed (a 5xx kind, a bug): a fast 404 lets the client fetch elsewhere.
    what = str(exc) if isinstance(exc, PeermirrorError) else type(exc).__name__
    error = OciError(_UNKNOWN[kind], f"this node failed to answer ({what})", status=404)
    return error, Result.ERROR


def _result_of_status(status: int, served_by_peer: bool = False) -> Result:
    if status < 400:
        return Result.PEER_HIT if served_by_peer else Result.LOCAL_HIT
    if status == 404:
        return Result.NOT_FOUND
    return Result.CLIENT_ERROR if status < 500 else Result.ERROR


def note_failure(request: AnyRequest, exc: BaseException) -> OciError:
    """Record how `exc` ends the request (for its count and log line); returns its answer."""
    exchange = begin(request)
    if isinstance(exc, SanicException) and exc.status_code < 500:
        error = _from_sanic(request, exc)
        result = _result_of_status(error.status)
    else:
        error, result = classify(exc, exchange.kind)
    exchange.result = result
    if isinstance(exc, (OciError, SanicException)):
        exchange.error = error.message
    else:
        exchange.error = str(exc) or type(exc).__name__
    if not isinstance(exc, (PeermirrorError, SanicException)):
        # A bug: its traceback goes into the request's log line, never to the client.
        exchange.exc_info = exc
    return error


def render_error(request: AnyRequest, exception: Exception) -> HTTPResponse:
    """The app's one error handler: every exception becomes an OCI error body."""
    return error_response(note_failure(request, exception))


# --- the request's end -------------------------------------------------------------------------


async def on_answered(request: AnyRequest, response: HTTPResponse) -> None:
    """Signal ``http.lifecycle.response``: the handler (or error handler) is done."""
    exchange = begin(request)
    if exchange.status is None:
        exchange.status = response.status
    if exchange.result is None:
        served_by_peer = bool(getattr(request.ctx, "served_by_peer", False))
        exchange.result = _result_of_status(response.status, served_by_peer)
    finish(request)


async def on_connection_closed(conn_info: ConnInfo) -> None:
    """Signal ``http.lifecycle.complete``: a request the connection closed under is over too."""
    request: AnyRequest | None = getattr(conn_info.ctx, "open_request", None)
    if request is None:
        return
    exchange: Exchange = request.ctx.exchange
    if exchange.result is None:
        exchange.result = Result.ERROR
        exchange.error = "cancelled: the client went away or the server is stopping"
    finish(request)


def finish(request: AnyRequest) -> None:
    """Count and log one finished request, once. The registry label is the one policy accepted
    (a bounded set); a refused or unparsable request gets none."""
    exchange: Exchange = request.ctx.exchange
    if exchange.done:
        return
    exchange.done = True
    conn: ConnInfo | None = request.conn_info
    if conn is not None and getattr(conn.ctx, "open_request", None) is request:
        conn.ctx.open_request = None
    result = exchange.result or Result.ERROR
    seconds = time.monotonic() - exchange.started
    registry: str = getattr(request.ctx, "registry", "")
    ctx = request.app.ctx
    if exchange.counted:
        ctx.stats.end(exchange.kind, result, exchange.from_peer)
        if ctx.metrics is not None:
            ctx.metrics.request_done(registry, exchange.kind, result, exchange.from_peer)
        if exchange.kind is not RequestKind.OTHER:
            ctx.stats.record_pull(_pull_record(request, registry, exchange, result, seconds))
    _log_line(request, registry, exchange, result, seconds)
    structlog.contextvars.reset_contextvars(**exchange.tokens)


def _log_line(
    request: AnyRequest, registry: str, exchange: Exchange, result: Result, seconds: float
) -> None:
    """The one line per request: INFO for misses, errors and requests from peers (the other
    half of another node's miss, so a pull can be followed there), DEBUG for local hits."""
    fields: dict[str, Any] = {
        "method": request.method,
        # Decoded as the handlers read it, so a path is found by what it names.
        "path": unquote(request.path),
        "status": exchange.status,
        "registry": registry,
        "kind": exchange.kind.value,
        "result": result.value,
        "source": source_label(exchange.from_peer),
        "ms": round(seconds * 1000, 2),
    }
    if exchange.error is not None:
        fields["error"] = exchange.error
    if exchange.exc_info is not None:
        fields["exc_info"] = exchange.exc_info
    if result is Result.LOCAL_HIT and not exchange.from_peer:
        log.debug("request", **fields)
    else:
        log.info("request", **fields)


def _pull_record(
    request: AnyRequest, registry: str, exchange: Exchange, result: Result, seconds: float
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
        kind=exchange.kind,
        result=result,
        from_peer=exchange.from_peer,
        source=source,
        bytes=int(getattr(request.ctx, "bytes_sent", 0)),
        seconds=seconds,
    )


def _client(request: AnyRequest) -> str:
    # The head may not have been parsed; the transport still knows the peer.
    try:
        return str(request.ip) or "unknown"
    except Exception:
        return "unknown"


def install(app: Any) -> None:
    """Put the edge around every request of `app`."""
    app.register_middleware(on_request, "request")
    app.register_middleware(on_response, "response")
    app.error_handler.add(Exception, render_error)
    app.signal("http.lifecycle.response")(on_answered)
    app.signal("http.lifecycle.complete")(on_connection_closed)
