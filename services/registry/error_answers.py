"""How every exception raised while answering becomes an OCI error answer, and how it counts.

Our errors keep their 4xx status (an :class:`OciError` as raised, our other kinds by their
``http_status``); Sanic's refusals (unknown route or method, oversized or slow request) get the
matching one; a failure on this node's side (a 5xx kind, a bug) is a 404 so containerd falls
back at once. Nothing here is sent with a 5xx or a traceback.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

from sanic import HTTPResponse, Request
from sanic.exceptions import (
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    SanicException,
)

from services.common.errors import PeermirrorError
from services.common.oci.errors import CONTENT_TYPE, ErrorCode, OciError
from services.registry.content import store_failed
from services.registry.headers import API_VERSION, API_VERSION_HEADER, OciErrorWithHeaders
from services.registry.limits import headers_too_large, limit_log
from services.registry.paths import no_such_endpoint
from services.registry.stats import RequestKind, Result

# The methods the pull API serves; every other one is a 405 naming these.
ALLOWED_METHODS = ("GET", "HEAD")
MAX_REQUEST_BODY_BYTES = 64 * 1024

AnyRequest = Request[Any, SimpleNamespace]

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
    limit_log.refused(limit, client_address(request), why)
    return error


def from_sanic(request: AnyRequest, exc: SanicException) -> OciError:
    """The answer to a request Sanic refused itself (a 4xx exception of its own)."""
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
        return exc, result_of_status(exc.status)
    status = exc.http_status if isinstance(exc, PeermirrorError) else 500
    if status < 500:
        code = _UNKNOWN[kind] if status == 404 else _CODES.get(status, ErrorCode.UNSUPPORTED)
        return OciError(code, str(exc), status=status), result_of_status(status)
    # This node's side failed (a 5xx kind, a bug): a fast 404 lets the client fetch elsewhere.
    what = str(exc) if isinstance(exc, PeermirrorError) else type(exc).__name__
    error = OciError(_UNKNOWN[kind], f"this node failed to answer ({what})", status=404)
    return error, Result.ERROR


def result_of_status(status: int, served_by_peer: bool = False) -> Result:
    """How a request answered with `status` counts."""
    if status < 400:
        return Result.PEER_HIT if served_by_peer else Result.LOCAL_HIT
    if status == 404:
        return Result.NOT_FOUND
    return Result.CLIENT_ERROR if status < 500 else Result.ERROR


def client_address(request: AnyRequest) -> str:
    """The client's address as the limit log names it."""
    # The head may not have been parsed; the transport still knows the peer.
    try:
        return str(request.ip) or "unknown"
    except Exception:
        return "unknown"
