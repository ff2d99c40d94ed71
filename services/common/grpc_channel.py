"""Options of every gRPC channel our services open: no proxy, quick reconnects, message bounds."""

from __future__ import annotations

from services.common.config import GrpcSection

# Our channels go to node-local or cluster-internal addresses: an HTTP proxy from the
# environment must never carry them.
NO_PROXY: tuple[tuple[str, int], ...] = (("grpc.enable_http_proxy", 0),)


def message_limit(max_message_bytes: int | None) -> int:
    """Bytes of one message either way: the value given, else grpc.max_message_bytes' default."""
    return GrpcSection().max_message_bytes if max_message_bytes is None else max_message_bytes


def channel_options(
    max_message_bytes: int | None = None, *, reconnect_ms: tuple[int, int] = (100, 1000)
) -> list[tuple[str, int]]:
    """Options of a client channel: no proxy, messages bounded both ways by
    `message_limit(max_message_bytes)`, and reconnects after (first, at most) `reconnect_ms`
    milliseconds: a restarted server is found again in that time, not after gRPC's default
    backoff of up to two minutes."""
    first, most = reconnect_ms
    limit = message_limit(max_message_bytes)
    return [
        *NO_PROXY,
        ("grpc.initial_reconnect_backoff_ms", first),
        ("grpc.min_reconnect_backoff_ms", first),
        ("grpc.max_reconnect_backoff_ms", most),
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
    ]
