"""The registry's HTTP edge: the middleware and the one error handler every request passes.

Handlers answer or raise; this module does the rest for every request, whichever route (or
Sanic itself, before any route) answers it:

- request middleware accepts the client's ``X-Request-Id`` (or makes one) and binds it to the
  structlog context, so every line logged while answering carries it; response middleware sends
  it back;
- :func:`render_error`, the app's only error handler, answers every exception with an OCI error
  body and a 4xx status (the rules are in :mod:`services.registry.error_answers`), keeping its
  cause for the log line;
- once the request is over, its outcome is counted (pull API requests only: the /v2 routes) and
  written as exactly one ``request`` log line. "Over" is a Sanic lifecycle signal, not response
  middleware, which runs when a streamed body has only begun: ``http.lifecycle.response`` after
  the handler is done, ``http.lifecycle.complete`` when the connection closes under a request
  that never finished (the client left, or the handler was cancelled).
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import structlog
from sanic import HTTPResponse
from sanic.exceptions import SanicException
from sanic.models.server_types import ConnInfo

from services.common.errors import PeermirrorError
from services.common.logsetup import get_logger
from services.common.oci.errors import OciError
from services.common.request_id import HTTP_HEADER as REQUEST_ID_HEADER
from services.common.request_id import LOG_KEY as REQUEST_ID_KEY
from services.common.request_id import accept_request_id
from services.registry.error_answers import (
    AnyRequest,
    classify,
    client_address,
    error_response,
    from_sanic,
    result_of_status,
)
from services.registry.headers import PEER_HEADER, is_peer_request
from services.registry.limits import limit_log
from services.registry.metrics import source_label
from services.registry.paths import Kind, Route, kind_hint
from services.registry.stats import PullRecord, RequestKind, Result

PULL_API = "/v2"

log = get_logger(__name__)

_KINDS: dict[Kind | None, RequestKind] = {
    Kind.MANIFEST: RequestKind.MANIFEST,
    Kind.BLOB: RequestKind.BLOB,
}


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
        why = "client refused: request URI too long"
        limit_log.refused("max_uri_bytes", client_address(request), why)
        raise too_long


async def on_response(request: AnyRequest, response: HTTPResponse) -> None:
    """Response middleware: the id the request is logged with goes back to the client."""
    exchange = begin(request)
    exchange.status = response.status
    response.headers[REQUEST_ID_HEADER] = exchange.request_id


# --- errors ------------------------------------------------------------------------------------


def note_failure(request: AnyRequest, exc: BaseException) -> OciError:
    """Record how `exc` ends the request (for its count and log line); returns its answer."""
    exchange = begin(request)
    if isinstance(exc, SanicException) and exc.status_code < 500:
        error = from_sanic(request, exc)
        result = result_of_status(error.status)
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
        exchange.result = result_of_status(response.status, served_by_peer)
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


def install(app: Any) -> None:
    """Put the edge around every request of `app`."""
    app.register_middleware(on_request, "request")
    app.register_middleware(on_response, "response")
    app.error_handler.add(Exception, render_error)
    app.signal("http.lifecycle.response")(on_answered)
    app.signal("http.lifecycle.complete")(on_connection_closed)
