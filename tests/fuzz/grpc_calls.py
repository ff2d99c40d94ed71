"""Sends serialized fuzz requests to any gRPC method and keeps what came back: status, message,
the reply (or the first streamed replies), so a fuzz test can check answers, not only codes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

# A streamed answer is read this far: enough to see it is well-formed, bounded in time.
MAX_STREAM_ITEMS = 50


@dataclass
class Outcome:
    """One call's end: its status, the status message, and the replies read (streams: in order)."""

    code: grpc.StatusCode
    details: str = ""
    replies: list[Message] = field(default_factory=list)


def _as_is(payload: bytes) -> bytes:
    return payload


def _unary_outcome(call: grpc.Future[Message]) -> Outcome:
    try:
        reply = call.result()
    except grpc.RpcError as exc:
        return Outcome(exc.code(), exc.details() or "")
    return Outcome(grpc.StatusCode.OK, replies=[reply])


def _stream_outcome(call: Iterator[Message]) -> Outcome:
    """Read a bounded part of a streamed answer, then let go of the rest."""
    replies: list[Message] = []
    try:
        for reply in call:
            replies.append(reply)
            if len(replies) >= MAX_STREAM_ITEMS:
                call.cancel()  # type: ignore[attr-defined]
                break
    except grpc.RpcError as exc:
        return Outcome(exc.code(), exc.details() or "", replies)
    return Outcome(grpc.StatusCode.OK, replies=replies)


def call_batch(
    channel: grpc.Channel, method: MethodDescriptor, requests: list[bytes], timeout: float
) -> list[Outcome]:
    """Send `requests` (unary ones concurrently, so the server interleaves them), each with a
    deadline of `timeout` seconds, and collect each outcome in request order."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    reply_type = GetMessageClass(method.output_type)
    if method.server_streaming:
        stream = channel.unary_stream(
            path, request_serializer=_as_is, response_deserializer=reply_type.FromString
        )
        # One at a time: unread concurrent streams would share (and could exhaust) the
        # connection's flow-control window while the first one is being read.
        return [_stream_outcome(stream(request, timeout=timeout)) for request in requests]
    unary = channel.unary_unary(
        path, request_serializer=_as_is, response_deserializer=reply_type.FromString
    )
    calls = [unary.future(request, timeout=timeout) for request in requests]
    return [_unary_outcome(call) for call in calls]
