"""The request id that lets one pull be followed across nodes' logs (HTTP header, gRPC metadata).

The registry accepts an incoming ``X-Request-Id`` (or makes one), binds it with structlog's
contextvars so every line logged while answering carries ``request_id``, and sends it on with
the discovery lookup (gRPC metadata ``x-request-id``) and the peer request (the same HTTP
header). Tasks started while it is bound inherit it (asyncio copies the context).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

import structlog

HTTP_HEADER = "X-Request-Id"
GRPC_METADATA_KEY = "x-request-id"
LOG_KEY = "request_id"
# Longest incoming id kept; anything longer, empty or unprintable is replaced by a fresh one.
MAX_LENGTH = 128


def new_request_id() -> str:
    """A fresh id: 32 hex digits."""
    return uuid.uuid4().hex


def accept_request_id(value: str | None) -> str:
    """`value` when it is a usable id (printable, no whitespace, at most MAX_LENGTH), else a
    fresh one: a log line must never be forged or split by what a client sends."""
    if not value or len(value) > MAX_LENGTH or " " in value:
        return new_request_id()
    if value.isascii() and value.isprintable():
        return value
    return new_request_id()


def current_request_id() -> str | None:
    """The id bound for the request being handled, if any."""
    value = structlog.contextvars.get_contextvars().get(LOG_KEY)
    return value if isinstance(value, str) else None


def outgoing_headers() -> dict[str, str]:
    """HTTP headers carrying the current id (empty when none is bound)."""
    rid = current_request_id()
    return {HTTP_HEADER: rid} if rid is not None else {}


def outgoing_metadata() -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying the current id (empty when none is bound)."""
    rid = current_request_id()
    return ((GRPC_METADATA_KEY, rid),) if rid is not None else ()


def from_metadata(metadata: Iterable[Any] | None) -> str | None:
    """The id in incoming gRPC metadata (key/value pairs), if a usable one."""
    if metadata is None:
        return None
    for item in metadata:
        key, value = item[0], item[1]
        if key == GRPC_METADATA_KEY and isinstance(value, str):
            accepted = accept_request_id(value)
            return accepted if accepted == value else None
    return None
