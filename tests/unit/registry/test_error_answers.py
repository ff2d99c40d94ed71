"""The rules turning an exception into an answer and a count: every kind of error
becomes an OCI error with a 4xx status, and failures on this node's side a 404."""

from __future__ import annotations

import pytest

from services.common.errors import (
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
    UnimplementedError,
)
from services.common.oci.errors import ErrorCode, OciError
from services.common.store.protocol import ContentStore, StoreUnavailableError
from services.registry.backend import StoreKeeper
from services.registry.cache import ContentCache
from services.registry.content import ContentService
from services.registry.error_answers import RefusedError, classify, method_refused
from services.registry.headers import RangeNotSatisfiableError, select_range
from services.registry.stats import RequestKind, Result
from services.registry.upstream.errors import UpstreamError


@pytest.mark.parametrize(
    ("exc", "kind", "status", "code", "result"),
    [
        (
            OciError(ErrorCode.MANIFEST_UNKNOWN),
            RequestKind.MANIFEST,
            404,
            "MANIFEST_UNKNOWN",
            Result.NOT_FOUND,
        ),
        (
            OciError(ErrorCode.NAME_INVALID),
            RequestKind.BLOB,
            400,
            "NAME_INVALID",
            Result.CLIENT_ERROR,
        ),
        (
            RefusedError.of(OciError(ErrorCode.NAME_UNKNOWN)),
            RequestKind.BLOB,
            404,
            "NAME_UNKNOWN",
            Result.REFUSED,
        ),
        (
            InvalidArgumentError("bad", field="ns"),
            RequestKind.MANIFEST,
            400,
            "UNSUPPORTED",
            Result.CLIENT_ERROR,
        ),
        (PermissionDeniedError("no"), RequestKind.BLOB, 403, "DENIED", Result.CLIENT_ERROR),
        (
            ResourceExhaustedError("busy"),
            RequestKind.BLOB,
            429,
            "TOOMANYREQUESTS",
            Result.CLIENT_ERROR,
        ),
        (NotFoundError("gone"), RequestKind.BLOB, 404, "BLOB_UNKNOWN", Result.NOT_FOUND),
        (
            UpstreamError("no upstream"),
            RequestKind.MANIFEST,
            404,
            "MANIFEST_UNKNOWN",
            Result.NOT_FOUND,
        ),
        (UnavailableError("peer down"), RequestKind.BLOB, 404, "BLOB_UNKNOWN", Result.ERROR),
        (UnimplementedError("off"), RequestKind.OTHER, 404, "NAME_UNKNOWN", Result.ERROR),
        (KeyError("bug"), RequestKind.MANIFEST, 404, "MANIFEST_UNKNOWN", Result.ERROR),
        (
            OciError(ErrorCode.BLOB_UNKNOWN, status=503),
            RequestKind.BLOB,
            404,
            "BLOB_UNKNOWN",
            Result.ERROR,
        ),
    ],
)
def test_every_error_is_a_4xx_oci_answer(
    exc: BaseException, kind: RequestKind, status: int, code: str, result: Result
) -> None:
    error, counted = classify(exc, kind)
    assert (error.status, str(error.code), counted) == (status, code, result)
    assert error.body().startswith(b'{"errors":[')


def test_a_bug_is_named_by_its_type_only() -> None:
    error, _ = classify(KeyError("/etc/secret"), RequestKind.BLOB)
    assert "KeyError" in error.message and "secret" not in error.message


async def test_a_store_failure_is_a_404_counted_as_an_error() -> None:
    async def never_opens() -> ContentStore:
        raise AssertionError("the keeper is not started here")

    # A keeper that has not opened its store yet: lookups fail as the store being down.
    content = ContentService(StoreKeeper(ContentCache(), never_opens))
    with pytest.raises(OciError) as raised:
        await content.blob("sha256:" + "a" * 64)
    assert isinstance(raised.value.__cause__, StoreUnavailableError)
    error, counted = classify(raised.value, RequestKind.BLOB)
    assert (error.status, counted) == (404, Result.ERROR)


def test_answers_with_headers_keep_them() -> None:
    with pytest.raises(RangeNotSatisfiableError) as raised:
        select_range("bytes=50-60", 10, "docker.io")
    error, counted = classify(raised.value, RequestKind.BLOB)
    assert (error.status, counted) == (416, Result.CLIENT_ERROR)
    assert raised.value.headers["Content-Range"] == "bytes */10"
    refused = method_refused("PUT", ["GET", "HEAD"])
    assert (refused.status, refused.headers) == (405, {"Allow": "GET, HEAD"})
