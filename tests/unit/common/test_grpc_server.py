"""gRPC server helper: standard health and reflection, loud bind errors, graceful stop."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.common.grpc_server import (
    HEALTH_SERVICE_NAME,
    REFLECTION_SERVICE_NAME,
    AddressInUseError,
    GrpcServer,
    run_until_signal,
)
from tests.harness.wait import wait_until

ECHO_SERVICE = "peermirror.test.v1.Echo"
ECHO_METHOD = f"/{ECHO_SERVICE}/Echo"


def _identity(b: bytes) -> bytes:
    return b


class EchoService:
    """A raw-bytes service, so the test needs no generated code; ``gate`` can hold calls whose
    request is ``b"slow"``."""

    def __init__(self) -> None:
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def echo(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        self.entered.set()
        if self.gate is not None and request == b"slow":
            await self.gate.wait()
        return b"echo:" + request

    def add(self, server: grpc.aio.Server) -> None:
        handler = grpc.method_handlers_generic_handler(
            ECHO_SERVICE,
            {
                "Echo": grpc.unary_unary_rpc_method_handler(
                    self.echo, request_deserializer=_identity, response_serializer=_identity
                )
            },
        )
        server.add_generic_rpc_handlers((handler,))


@pytest.fixture
async def echo_server() -> AsyncIterator[tuple[GrpcServer, EchoService]]:
    echo = EchoService()
    server = GrpcServer("127.0.0.1:0", name="test")
    server.add_service(ECHO_SERVICE, echo.add)
    await server.start()
    try:
        yield server, echo
    finally:
        await server.stop(grace=None)


async def health_status(address: str, service: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        return int(response.status)


async def echo_call(address: str, payload: bytes) -> bytes:
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(
            ECHO_METHOD, request_serializer=_identity, response_deserializer=_identity
        )
        result: bytes = await call(payload, timeout=10)
        return result


async def test_health_reports_serving(echo_server: tuple[GrpcServer, EchoService]) -> None:
    server, _ = echo_server
    assert server.port > 0
    assert server.bound_address == f"127.0.0.1:{server.port}"
    serving = health_pb2.HealthCheckResponse.SERVING
    assert await health_status(server.bound_address, "") == serving
    assert await health_status(server.bound_address, ECHO_SERVICE) == serving


async def test_health_unknown_service_is_not_found(
    echo_server: tuple[GrpcServer, EchoService],
) -> None:
    server, _ = echo_server
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await health_status(server.bound_address, "no.such.Service")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_set_serving_flips_status(echo_server: tuple[GrpcServer, EchoService]) -> None:
    server, _ = echo_server
    await server.set_serving(ECHO_SERVICE, False)
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    assert await health_status(server.bound_address, ECHO_SERVICE) == not_serving
    assert await health_status(server.bound_address, "") == health_pb2.HealthCheckResponse.SERVING
    await server.set_serving(ECHO_SERVICE, True)
    serving = health_pb2.HealthCheckResponse.SERVING
    assert await health_status(server.bound_address, ECHO_SERVICE) == serving


async def test_start_not_serving() -> None:
    server = GrpcServer("127.0.0.1:0")
    server.add_service(ECHO_SERVICE, EchoService().add)
    await server.start(serving=False)
    try:
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        assert await health_status(server.bound_address, "") == not_serving
        assert await health_status(server.bound_address, ECHO_SERVICE) == not_serving
    finally:
        await server.stop(grace=None)


async def test_added_servicer_answers(echo_server: tuple[GrpcServer, EchoService]) -> None:
    server, _ = echo_server
    assert await echo_call(server.bound_address, b"hi") == b"echo:hi"


async def test_reflection_lists_services(echo_server: tuple[GrpcServer, EchoService]) -> None:
    server, _ = echo_server
    async with grpc.aio.insecure_channel(server.bound_address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        names: set[str] = set()
        async for response in stub.ServerReflectionInfo(iter([request]), timeout=10):
            names.update(s.name for s in response.list_services_response.service)
    assert names == {ECHO_SERVICE, HEALTH_SERVICE_NAME, REFLECTION_SERVICE_NAME}
    assert HEALTH_SERVICE_NAME == "grpc.health.v1.Health"


async def test_second_server_on_same_port_fails_loudly(
    echo_server: tuple[GrpcServer, EchoService],
) -> None:
    server, _ = echo_server
    address = f"127.0.0.1:{server.port}"
    second = GrpcServer(address)
    with pytest.raises(AddressInUseError) as err:
        await second.start()
    assert address in str(err.value)
    assert err.value.address == address
    # The first server is untouched.
    assert await echo_call(server.bound_address, b"still") == b"echo:still"


async def test_unix_socket_listener(tmp_path: Path) -> None:
    path = tmp_path / "svc.sock"
    server = GrpcServer(f"unix:{path}")
    assert await server.start() == 0
    try:
        assert server.bound_address == f"unix:{path}"
        serving = health_pb2.HealthCheckResponse.SERVING
        assert await health_status(f"unix:{path}", "") == serving
        with pytest.raises(AddressInUseError, match=str(path)):
            await GrpcServer(f"unix:{path}").start()
        # The failed attempt must not have taken the socket over.
        assert await health_status(f"unix:{path}", "") == serving
    finally:
        await server.stop(grace=None)


async def test_stale_unix_socket_is_reused(tmp_path: Path) -> None:
    path = tmp_path / "svc.sock"
    # A socket file left by a dead process (bound, never unlinked) must not block a restart.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    assert path.is_socket()
    second = GrpcServer(f"unix:{path}")
    await second.start()
    try:
        serving = health_pb2.HealthCheckResponse.SERVING
        assert await health_status(f"unix:{path}", "") == serving
    finally:
        await second.stop(grace=None)


async def test_stop_lets_in_flight_calls_finish(
    echo_server: tuple[GrpcServer, EchoService],
) -> None:
    server, echo = echo_server
    echo.gate = asyncio.Event()
    call = asyncio.create_task(echo_call(server.bound_address, b"slow"))
    await echo.entered.wait()
    stopping = asyncio.create_task(server.stop(grace=30))

    # New calls are refused once the stop began, while the held one is still running (a late
    # call that got in before the stop began is answered at once: it is not held).
    async def refused() -> bool:
        try:
            await echo_call(server.bound_address, b"late")
        except grpc.aio.AioRpcError:
            return True
        return False

    await wait_until(refused, 10.0, 0.01, what="new calls refused while stopping")
    assert not call.done()
    echo.gate.set()
    assert await call == b"echo:slow"
    await stopping


async def test_stop_is_idempotent_and_safe_before_start() -> None:
    server = GrpcServer("127.0.0.1:0")
    await server.stop()
    await server.start()
    await server.stop(grace=None)
    await server.stop(grace=None)


async def test_add_service_after_start_is_refused(
    echo_server: tuple[GrpcServer, EchoService],
) -> None:
    server, echo = echo_server
    with pytest.raises(RuntimeError):
        server.add_service("late.Service", echo.add)


async def test_run_until_signal_stops_on_sigterm(
    echo_server: tuple[GrpcServer, EchoService],
) -> None:
    server, _ = echo_server
    stopped: list[bool] = []

    async def on_stop() -> None:
        await server.stop(grace=1)
        stopped.append(True)

    async def work() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.Event().wait()

    received = await run_until_signal(on_stop, work=work())
    assert received == signal.SIGTERM
    assert stopped == [True]
    with pytest.raises(grpc.aio.AioRpcError):
        await health_status(server.bound_address, "")
    # A late stop signal (a killed node's children can be sent more than one) is ignored until
    # the loop closes instead of taking its default, fatal action: this test is still running.
    # Ignored by the kernel: no handler writes to the loop's wakeup socket, which the loop's
    # close() shuts before it removes its handlers (a signal in between was an EBADF warning
    # on the service's stderr).
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.sleep(0)  # one loop turn: a handler would have run (a yield, not a wait)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN


async def test_run_until_signal_sigint() -> None:
    async def work() -> None:
        os.kill(os.getpid(), signal.SIGINT)
        await asyncio.Event().wait()

    async def on_stop() -> None:
        return None

    assert await run_until_signal(on_stop, work=work()) == signal.SIGINT


async def test_run_until_signal_reraises_work_failure_after_stopping() -> None:
    stopped: list[bool] = []

    async def on_stop() -> None:
        stopped.append(True)

    async def work() -> None:
        raise RuntimeError("store vanished")

    with pytest.raises(RuntimeError, match="store vanished"):
        await run_until_signal(on_stop, work=work())
    assert stopped == [True]


async def test_run_until_signal_returns_none_when_work_ends() -> None:
    async def on_stop() -> None:
        return None

    async def work() -> None:
        return None

    assert await run_until_signal(on_stop, work=work()) is None


async def test_run_until_signal_cuts_an_overrunning_stop() -> None:
    cancelled: list[bool] = []

    async def on_stop() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def work() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.Event().wait()

    assert await run_until_signal(on_stop, work=work(), stop_timeout=0.05) == signal.SIGTERM
    assert cancelled == [True]
