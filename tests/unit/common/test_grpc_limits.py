"""The gRPC input limits: their config keys, the key checks, and the too-large-message log."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.config import (
    ConfigError,
    DiscoverySection,
    GrpcSection,
    NodeConfig,
    load_config,
)
from services.common.errors import InvalidArgumentError
from services.common.grpc_server import MESSAGE_LIMIT, GrpcServer, client_of
from services.common.ratelog import LimitLog
from services.discovery.kademlia import DhtConfig
from services.discovery.local_servicer import KeyLimitExceeded, KeyLimits
from services.discovery.service import dht_config
from tests.harness.wait import wait_until

# (dotted key, default): the limits that were constants before they were config keys.
LIMIT_KEYS = [
    ("discovery.max_keys_per_advertise", 10_000),
    ("discovery.max_keys_per_peer_call", 1024),
    ("discovery.max_key_length", 1024),
    ("grpc.max_message_bytes", 4 * 1024 * 1024),
]


def _value(cfg: NodeConfig, dotted: str) -> object:
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def _yaml(tmp_path: Path, dotted: str, value: object) -> Path:
    section, key = dotted.split(".")
    path = tmp_path / "node.yaml"
    path.write_text(f"{section}:\n  {key}: {value}\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(("dotted", "default"), LIMIT_KEYS)
def test_defaults_are_the_former_constants(dotted: str, default: int) -> None:
    assert _value(load_config(None, env={}), dotted) == default


def test_the_dht_core_default_matches_the_config_default() -> None:
    # The simulation builds DhtConfig() itself; the service passes the config value.
    assert DhtConfig().max_batch_keys == DiscoverySection().max_keys_per_peer_call


@pytest.mark.parametrize(("dotted", "default"), LIMIT_KEYS)
def test_a_configured_limit_is_read(tmp_path: Path, dotted: str, default: int) -> None:
    assert _value(load_config(_yaml(tmp_path, dotted, 7), env={}), dotted) == 7


@pytest.mark.parametrize(("dotted", "default"), LIMIT_KEYS)
@pytest.mark.parametrize(
    ("value", "problem"), [(0, "must be > 0, got 0"), (-5, "must be > 0, got -5")]
)
def test_a_limit_must_be_positive(
    tmp_path: Path, dotted: str, default: int, value: int, problem: str
) -> None:
    path = _yaml(tmp_path, dotted, value)
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert str(err.value) == f"{path}: {dotted}: {problem}"


@pytest.mark.parametrize(("dotted", "default"), LIMIT_KEYS)
def test_a_limit_must_be_an_int(tmp_path: Path, dotted: str, default: int) -> None:
    path = _yaml(tmp_path, dotted, "1.5")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert str(err.value) == f"{path}: {dotted}: expected int, got float 1.5"


@pytest.mark.parametrize(("dotted", "default"), LIMIT_KEYS)
def test_a_limit_from_the_environment(dotted: str, default: int) -> None:
    var = "PEERMIRROR_" + dotted.upper().replace(".", "__")
    assert _value(load_config(None, env={var: "9"}), dotted) == 9
    with pytest.raises(ConfigError) as err:
        load_config(None, env={var: "0"})
    assert str(err.value) == f"environment {var}: must be > 0, got 0"


def test_unknown_key_in_the_grpc_section(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text("grpc:\n  max_message_size: 10\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"unknown key 'grpc\.max_message_size'"):
        load_config(path, env={})


def test_the_service_passes_the_peer_batch_limit_to_the_core() -> None:
    cfg = NodeConfig(discovery=DiscoverySection(max_keys_per_peer_call=5))
    assert dht_config(cfg).max_batch_keys == 5


def test_key_limits_name_the_limit_they_enforce() -> None:
    limits = KeyLimits.of(DiscoverySection(max_keys_per_advertise=2, max_key_length=4))
    assert limits.check_key_list(["abcd", "ef"]) == ["abcd", "ef"]
    with pytest.raises(KeyLimitExceeded) as many:
        limits.check_key_list(["a", "b", "c"])
    assert (many.value.limit, many.value.maximum, many.value.field) == (
        "max_keys_per_advertise",
        2,
        "keys",
    )
    assert str(many.value) == "keys: at most 2 keys per call, got 3"
    with pytest.raises(KeyLimitExceeded) as long:
        limits.check_key_list(["a", "abcde"])
    assert (long.value.limit, long.value.field) == ("max_key_length", "keys[1]")
    assert str(long.value) == "keys[1]: longer than 4 characters"
    # Malformed keys are refused too, but are not limits.
    for bad in ("", "a b"):
        with pytest.raises(InvalidArgumentError) as err:
            limits.check_key(bad, "key")
        assert not isinstance(err.value, KeyLimitExceeded)


@pytest.mark.parametrize(
    ("peer", "client"),
    [
        ("ipv4:10.0.0.7:40112", "10.0.0.7"),
        ("ipv6:[::1]:40112", "::1"),
        ("ipv6:%5B::ffff:127.0.0.1%5D:40112", "::ffff:127.0.0.1"),
        ("unix:/run/peermirror.sock", "unix:/run/peermirror.sock"),
        ("", "unknown"),
    ],
)
def test_client_of_a_peer_drops_the_port(peer: str, client: str) -> None:
    assert client_of(peer) == client


# --- the too-large-message log on a real server ------------------------------------------

SERVICE = "peermirror.test.v1.Limits"
SMALL_LIMIT = 1024


class Recorded(LimitLog):
    """A LimitLog that also counts refusals and keeps every line it wrote."""

    def __init__(self) -> None:
        super().__init__("test.limits")
        self.lines: list[tuple[str, str, dict[str, Any]]] = []
        self.calls = 0

    def refused(self, limit: str, client: str, message: str, **fields: Any) -> bool:
        self.calls += 1
        written = super().refused(limit, client, message, **fields)
        if written:
            self.lines.append((limit, client, fields))
        return written


def _raw(b: bytes) -> bytes:
    return b


class LimitsService:
    """Raw-bytes methods of each handler shape: unary, streamed replies from a generator."""

    def __init__(self) -> None:
        self.streams_closed = 0

    async def echo(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return b"echo:" + request

    async def count(
        self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        try:
            for i in range(int(request)):
                yield str(i).encode()
        finally:
            self.streams_closed += 1

    def add(self, server: grpc.aio.Server) -> None:
        handlers = {
            "Echo": grpc.unary_unary_rpc_method_handler(self.echo, _raw, _raw),
            "Count": grpc.unary_stream_rpc_method_handler(self.count, _raw, _raw),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


@pytest.fixture
async def limited() -> AsyncIterator[tuple[GrpcServer, LimitsService, Recorded]]:
    service, log = LimitsService(), Recorded()
    server = GrpcServer("127.0.0.1:0", max_message_bytes=SMALL_LIMIT, limit_log=log)
    server.add_service(SERVICE, service.add)
    await server.start()
    try:
        yield server, service, log
    finally:
        await server.stop(grace=None)


async def test_calls_within_the_limit_are_served_by_every_handler_shape(
    limited: tuple[GrpcServer, LimitsService, Recorded],
) -> None:
    server, service, log = limited
    async with grpc.aio.insecure_channel(server.bound_address) as channel:
        echo = channel.unary_unary(f"/{SERVICE}/Echo", _raw, _raw)
        assert await echo(b"x" * (SMALL_LIMIT - 16), timeout=5) == b"echo:" + b"x" * 1008
        count = channel.unary_stream(f"/{SERVICE}/Count", _raw, _raw)
        assert [r async for r in count(b"3", timeout=5)] == [b"0", b"1", b"2"]
        # A client leaving mid-stream still lets the handler clean up.
        call = count(b"1000000", timeout=5)
        assert await call.read() == b"0"
        call.cancel()
        # health's Watch writes its answers itself (the other streaming style).
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
        first = await watch.read()
        assert isinstance(first, health_pb2.HealthCheckResponse)
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
    await wait_until(lambda: service.streams_closed == 2, 5)
    assert log.lines == []


async def test_too_large_requests_are_refused_and_logged_once_per_client(
    limited: tuple[GrpcServer, LimitsService, Recorded],
) -> None:
    server, _, log = limited
    payload = b"x" * (SMALL_LIMIT + 1)
    async with grpc.aio.insecure_channel(server.bound_address) as channel:
        echo = channel.unary_unary(f"/{SERVICE}/Echo", _raw, _raw)
        count = channel.unary_stream(f"/{SERVICE}/Count", _raw, _raw)
        calls: list[Awaitable[object]] = [
            echo(payload, timeout=5),
            count(payload, timeout=5).read(),
            echo(payload),
        ]
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert err.value.details() == (
                f"SERVER: Received message larger than max ({SMALL_LIMIT + 1} vs. {SMALL_LIMIT})"
            )
        # The server goes on answering the same client.
        assert await echo(b"ok", timeout=5) == b"echo:ok"
    await wait_until(lambda: log.calls == len(calls), 5)
    [(limit, client, fields)] = log.lines
    assert (limit, client) == (MESSAGE_LIMIT, "127.0.0.1")
    assert fields["max"] == SMALL_LIMIT and fields["server"] == "grpc"
    assert fields["method"] in {f"/{SERVICE}/Echo", f"/{SERVICE}/Count"}


def test_the_message_limit_defaults_to_the_config_default() -> None:
    assert GrpcServer("127.0.0.1:0").max_message_bytes == GrpcSection().max_message_bytes
