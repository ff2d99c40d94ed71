"""The one error tree: a handler raises a PeermirrorError, the gRPC server answers its status."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from services.common.errors import (
    InvalidArgumentError,
    NotFoundError,
    PeermirrorError,
    ResourceExhaustedError,
    UnavailableError,
    error_for_status,
)
from services.common.grpc_server import GrpcServer

SERVICE = "peermirror.test.v1.Errors"
Context = grpc.aio.ServicerContext[bytes, bytes]


def _raw(b: bytes) -> bytes:
    return b


def _error(request: bytes) -> PeermirrorError | None:
    """The error a request names: b"invalid", b"missing", b"busy", or none."""
    if request == b"invalid":
        return InvalidArgumentError("must be a digest", field="keys[3]")
    if request == b"missing":
        return NotFoundError("no such lease")
    if request == b"busy":
        return ResourceExhaustedError("too many records")
    return None


async def unary(request: bytes, context: Context) -> bytes:
    error = _error(request)
    if error is not None:
        raise error
    return b"ok"


async def streamed(request: bytes, context: Context) -> AsyncIterator[bytes]:
    yield b"first"  # an error after a reply still ends the call with its status
    error = _error(request)
    if error is not None:
        raise error
    yield b"last"


async def written(request: bytes, context: Context) -> None:
    error = _error(request)
    if error is not None:
        raise error
    await context.write(b"ok")


def _add(server: grpc.aio.Server) -> None:
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(
            unary, request_deserializer=_raw, response_serializer=_raw
        ),
        "Streamed": grpc.unary_stream_rpc_method_handler(
            streamed, request_deserializer=_raw, response_serializer=_raw
        ),
        "Written": grpc.unary_stream_rpc_method_handler(
            written, request_deserializer=_raw, response_serializer=_raw
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


@pytest.fixture
async def address() -> AsyncIterator[str]:
    server = GrpcServer("127.0.0.1:0", name="errors-test")
    server.add_service(SERVICE, _add)
    await server.start()
    try:
        yield server.bound_address
    finally:
        await server.stop(grace=0)


async def _call(address: str, method: str, request: bytes) -> list[bytes]:
    async with grpc.aio.insecure_channel(address) as channel:
        path = f"/{SERVICE}/{method}"
        if method == "Unary":
            call = channel.unary_unary(path, request_serializer=_raw, response_deserializer=_raw)
            return [await call(request, timeout=5)]
        stream = channel.unary_stream(path, request_serializer=_raw, response_deserializer=_raw)
        return [reply async for reply in stream(request, timeout=5)]


@pytest.mark.parametrize("method", ["Unary", "Streamed", "Written"])
@pytest.mark.parametrize(
    ("request_", "status", "details"),
    [
        (b"invalid", grpc.StatusCode.INVALID_ARGUMENT, "keys[3]: must be a digest"),
        (b"missing", grpc.StatusCode.NOT_FOUND, "no such lease"),
        (b"busy", grpc.StatusCode.RESOURCE_EXHAUSTED, "too many records"),
    ],
)
async def test_a_raised_error_is_answered_with_its_status(
    address: str, method: str, request_: bytes, status: grpc.StatusCode, details: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _call(address, method, request_)
    assert refused.value.code() == status
    assert refused.value.details() == details


@pytest.mark.parametrize("method", ["Unary", "Streamed", "Written"])
async def test_calls_without_errors_are_answered(address: str, method: str) -> None:
    replies = await _call(address, method, b"fine")
    assert (
        replies == {"Unary": [b"ok"], "Streamed": [b"first", b"last"], "Written": [b"ok"]}[method]
    )


def test_every_kind_carries_both_statuses() -> None:
    error = InvalidArgumentError("is required", field="sender")
    assert (error.grpc_status, error.http_status, error.field) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        400,
        "sender",
    )
    assert str(error) == "sender: is required"
    assert isinstance(error, ValueError)  # callers catching ValueError still catch it
    assert isinstance(NotFoundError("x"), LookupError)
    assert UnavailableError("x").http_status == 503


def test_a_status_from_another_node_maps_back_to_its_kind() -> None:
    for kind in (InvalidArgumentError, NotFoundError, ResourceExhaustedError, UnavailableError):
        error = error_for_status(kind.grpc_status, "said the peer")
        assert type(error) is kind
        assert str(error) == "said the peer"
    assert type(error_for_status(grpc.StatusCode.DATA_LOSS, "odd")) is PeermirrorError
