"""The one catalogue of OCI Distribution error codes, their HTTP statuses and the error body.

Every HTTP error the registry sends is an :class:`OciError` rendered by :func:`render`, so the
status and the ``{"errors": [...]}`` body always agree with the distribution spec (statuses as the
reference implementation, distribution/distribution, assigns them).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable
from dataclasses import dataclass

from services.common.errors import PeermirrorError

CONTENT_TYPE = "application/json"


class ErrorCode(enum.StrEnum):
    """Error codes of the OCI distribution spec, plus the one distribution extension we use."""

    BLOB_UNKNOWN = "BLOB_UNKNOWN"
    BLOB_UPLOAD_INVALID = "BLOB_UPLOAD_INVALID"
    BLOB_UPLOAD_UNKNOWN = "BLOB_UPLOAD_UNKNOWN"
    DIGEST_INVALID = "DIGEST_INVALID"
    MANIFEST_BLOB_UNKNOWN = "MANIFEST_BLOB_UNKNOWN"
    MANIFEST_INVALID = "MANIFEST_INVALID"
    MANIFEST_UNKNOWN = "MANIFEST_UNKNOWN"
    NAME_INVALID = "NAME_INVALID"
    NAME_UNKNOWN = "NAME_UNKNOWN"
    SIZE_INVALID = "SIZE_INVALID"
    UNAUTHORIZED = "UNAUTHORIZED"
    DENIED = "DENIED"
    UNSUPPORTED = "UNSUPPORTED"
    TOOMANYREQUESTS = "TOOMANYREQUESTS"
    # Not in the spec's list; distribution sends it with 416 for unsatisfiable ranges, and a
    # 416 still needs a body with some code.
    RANGE_INVALID = "RANGE_INVALID"

    @property
    def status(self) -> int:
        """The HTTP status this code implies."""
        return CATALOGUE[self].status

    @property
    def default_message(self) -> str:
        """The human-readable message used when the caller gives none."""
        return CATALOGUE[self].message

    @property
    def in_spec(self) -> bool:
        """Whether the OCI distribution spec itself defines this code."""
        return self is not ErrorCode.RANGE_INVALID


@dataclass(frozen=True, slots=True)
class ErrorSpec:
    """One catalogue entry."""

    status: int
    message: str


CATALOGUE: dict[ErrorCode, ErrorSpec] = {
    ErrorCode.BLOB_UNKNOWN: ErrorSpec(404, "blob unknown to registry"),
    ErrorCode.BLOB_UPLOAD_INVALID: ErrorSpec(400, "blob upload invalid"),
    ErrorCode.BLOB_UPLOAD_UNKNOWN: ErrorSpec(404, "blob upload unknown to registry"),
    ErrorCode.DIGEST_INVALID: ErrorSpec(400, "provided digest is invalid"),
    ErrorCode.MANIFEST_BLOB_UNKNOWN: ErrorSpec(404, "manifest references a blob unknown here"),
    ErrorCode.MANIFEST_INVALID: ErrorSpec(400, "manifest invalid"),
    ErrorCode.MANIFEST_UNKNOWN: ErrorSpec(404, "manifest unknown"),
    ErrorCode.NAME_INVALID: ErrorSpec(400, "invalid repository name"),
    ErrorCode.NAME_UNKNOWN: ErrorSpec(404, "repository name not known to registry"),
    ErrorCode.SIZE_INVALID: ErrorSpec(400, "provided length did not match content length"),
    ErrorCode.UNAUTHORIZED: ErrorSpec(401, "authentication required"),
    ErrorCode.DENIED: ErrorSpec(403, "requested access to the resource is denied"),
    ErrorCode.UNSUPPORTED: ErrorSpec(405, "the operation is unsupported"),
    ErrorCode.TOOMANYREQUESTS: ErrorSpec(429, "too many requests"),
    ErrorCode.RANGE_INVALID: ErrorSpec(416, "requested range not satisfiable"),
}


class OciError(PeermirrorError):
    """An error to answer with an OCI error body.

    ``code`` must be a catalogue code (an :class:`ErrorCode` or its string); ``message`` defaults
    to the catalogue text; ``detail`` is any JSON-serialisable value; ``status`` overrides the
    code's HTTP status (e.g. a 404 for a request we refuse so that containerd falls back).
    """

    def __init__(
        self,
        code: ErrorCode | str,
        message: str | None = None,
        detail: object = None,
        status: int | None = None,
    ) -> None:
        self.code = ErrorCode(code)
        self.message = message if message is not None else self.code.default_message
        self.detail = detail
        self.status = status if status is not None else self.code.status
        self.http_status = self.status
        super().__init__(f"{self.code}: {self.message}")

    def to_dict(self) -> dict[str, object]:
        """This error as one entry of the ``errors`` list (``detail`` omitted when None)."""
        entry: dict[str, object] = {"code": str(self.code), "message": self.message}
        if self.detail is not None:
            entry["detail"] = self.detail
        return entry

    def body(self) -> bytes:
        """The complete response body for this error alone."""
        return render([self])

    def __repr__(self) -> str:
        return (
            f"OciError({str(self.code)!r}, {self.message!r}, detail={self.detail!r}, "
            f"status={self.status})"
        )


def render(errors: OciError | Iterable[OciError]) -> bytes:
    """The spec's error body ``{"errors": [{"code", "message", "detail"?}, ...]}`` as JSON bytes.

    ``detail`` is left out of an entry when it is None (the spec makes it optional).
    """
    items = [errors] if isinstance(errors, OciError) else list(errors)
    if not items:
        raise ValueError("render() needs at least one error")
    return json.dumps(
        {"errors": [e.to_dict() for e in items]}, separators=(",", ":"), default=str
    ).encode()


def status_of(errors: OciError | Iterable[OciError]) -> int:
    """The HTTP status for a response carrying ``errors``: the first error's status."""
    if isinstance(errors, OciError):
        return errors.status
    for e in errors:
        return e.status
    raise ValueError("status_of() needs at least one error")
