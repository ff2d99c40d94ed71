"""The exceptions the containerd client raises, so callers never handle raw gRPC errors."""

from __future__ import annotations

import grpc

from services.common.errors import AlreadyExistsError, PeermirrorError
from services.common.store.protocol import ContentNotFoundError, StoreUnavailableError


class ContainerdError(PeermirrorError):
    """A containerd call failed; `code` is the gRPC status code when the daemon answered."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class ContainerdNotFoundError(ContentNotFoundError, ContainerdError):
    """containerd holds no such content or image in the client's namespace.

    A subclass of the content store's ContentNotFoundError, so store code lets it through
    unchanged.
    """

    def __init__(self, what: str, detail: str = "") -> None:
        ContentNotFoundError.__init__(self, what)
        self.code = grpc.StatusCode.NOT_FOUND
        self.detail = detail


class ContainerdAlreadyExistsError(ContainerdError, AlreadyExistsError):
    """The image name or content digest is already present (Create, or Write of known content)."""


class ContainerdUnavailableError(ContainerdError, StoreUnavailableError):
    """containerd cannot be reached (socket missing, daemon stopped or restarting, stream cut).

    The one error a long-running caller (the pinner) should answer by reconnecting: wait with
    `ContainerdClient.wait_connected()` and resync. Note containerd also reports a content ref
    locked by another writer as UNAVAILABLE; retrying later is right for that case too.
    """


def translate_rpc_error(err: grpc.aio.AioRpcError, what: str) -> ContainerdError:
    """Map a gRPC failure of an operation on `what` to our exception types."""
    return translate_status(err.code(), err.details() or "", what)


def translate_status(code: grpc.StatusCode, detail: str, what: str) -> ContainerdError:
    """Map a gRPC status of an operation on `what` to our exception types."""
    if code == grpc.StatusCode.NOT_FOUND:
        return ContainerdNotFoundError(what, detail)
    if code == grpc.StatusCode.ALREADY_EXISTS:
        return ContainerdAlreadyExistsError(f"already exists: {what}: {detail}", code)
    if code == grpc.StatusCode.UNAVAILABLE:
        return ContainerdUnavailableError(f"containerd unavailable ({what}): {detail}", code)
    return ContainerdError(f"containerd {code.name} ({what}): {detail}", code)
