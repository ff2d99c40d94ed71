"""The root of every error peermirror raises on purpose, and the statuses each kind implies.

Code raises the kind of error it means (:class:`InvalidArgumentError` naming the field,
:class:`NotFoundError`, :class:`UnavailableError`, ...); one place per protocol turns it into
an answer: the gRPC interceptor in ``grpc_server`` aborts with ``grpc_status``, an HTTP handler
answers ``http_status``. A service's own errors subclass these (the content store's not-found
and unavailable errors, the registry's OCI errors) so no handler maps statuses by hand.
"""

from __future__ import annotations

from typing import ClassVar

import grpc


class PeermirrorError(Exception):
    """An error of ours; the message names the field it is about when ``field`` is given."""

    grpc_status: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    http_status: int = 500

    def __init_subclass__(
        cls, *, grpc_status: grpc.StatusCode | None = None, http_status: int | None = None
    ) -> None:
        # A kind names its statuses in its class line; its subclasses inherit them.
        super().__init_subclass__()
        if grpc_status is not None:
            cls.grpc_status = grpc_status
        if http_status is not None:
            cls.http_status = http_status

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class InvalidArgumentError(
    PeermirrorError, ValueError, grpc_status=grpc.StatusCode.INVALID_ARGUMENT, http_status=400
):
    """A request (or input) field is malformed; ``field`` names it as the caller spells it."""


class UnauthenticatedError(
    PeermirrorError, grpc_status=grpc.StatusCode.UNAUTHENTICATED, http_status=401
):
    """The caller did not prove who it is."""


class PermissionDeniedError(
    PeermirrorError, grpc_status=grpc.StatusCode.PERMISSION_DENIED, http_status=403
):
    """The caller is known but may not do this."""


class NotFoundError(
    PeermirrorError, LookupError, grpc_status=grpc.StatusCode.NOT_FOUND, http_status=404
):
    """What was asked for does not exist here."""


class AlreadyExistsError(
    PeermirrorError, grpc_status=grpc.StatusCode.ALREADY_EXISTS, http_status=409
):
    """What was to be created exists already."""


class FailedPreconditionError(
    PeermirrorError, grpc_status=grpc.StatusCode.FAILED_PRECONDITION, http_status=412
):
    """The request is well formed but the state it needs does not hold."""


class ResourceExhaustedError(
    PeermirrorError, grpc_status=grpc.StatusCode.RESOURCE_EXHAUSTED, http_status=429
):
    """A configured bound (rate, count, size) refuses the request; retrying later may pass."""


class UnimplementedError(
    PeermirrorError, grpc_status=grpc.StatusCode.UNIMPLEMENTED, http_status=501
):
    """This node does not offer the operation (switched off, or an older version)."""


class UnavailableError(PeermirrorError, grpc_status=grpc.StatusCode.UNAVAILABLE, http_status=503):
    """A party this answer depends on (containerd, a peer, the store) cannot be reached now."""


# The kinds a status received from another node maps back to (see error_for_status).
_BY_GRPC_STATUS: dict[grpc.StatusCode, type[PeermirrorError]] = {
    kind.grpc_status: kind
    for kind in (
        InvalidArgumentError,
        UnauthenticatedError,
        PermissionDeniedError,
        NotFoundError,
        AlreadyExistsError,
        FailedPreconditionError,
        ResourceExhaustedError,
        UnimplementedError,
        UnavailableError,
    )
}


def error_for_status(status: grpc.StatusCode, message: str) -> PeermirrorError:
    """The error a gRPC status answered by another node stands for, its details as message,
    so a refusal passes on with the same status (INTERNAL for statuses with no kind here)."""
    return _BY_GRPC_STATUS.get(status, PeermirrorError)(message)
