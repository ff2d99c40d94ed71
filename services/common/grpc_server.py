"""The one gRPC server helper every service uses: health, reflection, loud bind errors, clean stop.

Each service builds a :class:`GrpcServer`, adds its servicers, starts it and then waits in
:func:`run_until_signal`, which turns SIGTERM/SIGINT into a graceful stop bounded in time (the
acceptance bar is exit within 5 s). ``grpc.so_reuseport`` is switched off so a second process on a
taken port fails at start instead of silently sharing (and splitting) the port. Incoming messages
are bounded by ``grpc.max_message_bytes``, and the clients grpc refuses for it are logged once
per client and interval (:class:`MessageRefusalLog`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn, TypeAlias
from urllib.parse import unquote

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from services.common.errors import PeermirrorError
from services.common.grpc_channel import message_limit
from services.common.logsetup import get_logger
from services.common.ratelog import LimitLog

HEALTH_SERVICE_NAME: str = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
REFLECTION_SERVICE_NAME: str = reflection.SERVICE_NAME

# Total time a service may take to stop after SIGTERM before we stop waiting on it.
STOP_TIMEOUT = 5.0
# Time in-flight RPCs get to finish once a stop began; well inside STOP_TIMEOUT.
DEFAULT_GRACE = 3.0
# What grpc gets past the grace to cancel the calls left and finish its shutdown.
SHUTDOWN_MARGIN = 2.0

SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    # Off so binding a port another process holds fails instead of load-sharing with it.
    ("grpc.so_reuseport", 0),
)
# The config key bounding every incoming message (grpc.max_message_bytes), named in refusal logs.
MESSAGE_LIMIT = "max_message_bytes"

_log = get_logger(__name__)


# The handler and context types as grpc's stubs spell them (not subscriptable at run time).
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
ReadRequest: TypeAlias = Callable[[Context], Awaitable[Any]]


def client_of(peer: str) -> str:
    """Who a refusal is charged to, from gRPC's ``context.peer()``: a TCP caller's IP without
    its port (reconnecting does not make a new client), otherwise the peer string as is."""
    scheme, sep, rest = unquote(peer).partition(":")
    if sep and scheme in ("ipv4", "ipv6"):
        host = rest.rpartition(":")[0].removeprefix("[").removesuffix("]")
        if host:
            return host
    return peer or "unknown"


class _HandlerWrapper(grpc.aio.ServerInterceptor):
    """An interceptor that replaces each method's handler by a wrapped form, made once."""

    def __init__(self) -> None:
        # method -> (handler as registered, its wrapped form); handlers are fixed per method.
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, handler: Handler) -> Handler:
        raise NotImplementedError


class ErrorStatuses(_HandlerWrapper):
    """Answers a :class:`PeermirrorError` a handler raises with the status the error carries
    and its message (which names the field for INVALID_ARGUMENT): servicers raise, and this is
    the one place gRPC statuses are chosen. Every :class:`GrpcServer` installs it."""

    def _wrap(self, method: str, handler: Handler) -> Handler:
        unary = handler.unary_unary
        if unary is not None and inspect.iscoroutinefunction(unary):
            return grpc.unary_unary_rpc_method_handler(
                _answer_errors(unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        streaming = handler.unary_stream
        if streaming is not None and inspect.iscoroutinefunction(streaming):
            replies = _answer_errors(streaming)
        elif streaming is not None and inspect.isasyncgenfunction(streaming):
            replies = _answer_stream_errors(streaming)
        else:
            return handler  # a synchronous handler: left to grpc's own dispatch
        return grpc.unary_stream_rpc_method_handler(
            replies,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


async def _abort(context: Context, exc: PeermirrorError) -> NoReturn:
    await context.abort(exc.grpc_status, str(exc))
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


def _answer_errors(behaviour: Callable[..., Any]) -> Callable[..., Any]:
    async def call(request: Any, context: Context) -> Any:
        try:
            return await behaviour(request, context)
        except PeermirrorError as exc:
            await _abort(context, exc)

    return call


def _answer_stream_errors(behaviour: Callable[..., Any]) -> Callable[..., Any]:
    async def replies(request: Any, context: Context) -> AsyncIterator[Any]:
        try:
            # aclosing: the handler's own cleanup runs when the client goes away mid-stream.
            async with contextlib.aclosing(behaviour(request, context)) as inner:
                async for reply in inner:
                    yield reply
        except PeermirrorError as exc:
            await _abort(context, exc)

    return replies


class MessageRefusalLog(_HandlerWrapper):
    """Logs (rate limited, per client) the requests grpc refuses as larger than the limit.

    grpc core checks a message's size when the handler asks for it, and a unary handler is only
    called once its request arrived, so a refused request never reaches our code and the client
    is gone from the call by then. Served as a streaming-request handler instead, our wrapper
    runs first, notes ``context.peer()``, and sees the refusal as the request stream ending
    before its one message; grpc has already answered the client RESOURCE_EXHAUSTED. A client
    that cancels before its message arrives looks the same, which the log line says.
    """

    def __init__(self, server: str, max_bytes: int, limit_log: LimitLog) -> None:
        super().__init__()
        self._server = server
        self._max_bytes = max_bytes
        self._limit_log = limit_log

    def _wrap(self, method: str, handler: Handler) -> Handler:
        read = functools.partial(self._request, method)
        unary = handler.unary_unary
        if unary is not None and inspect.iscoroutinefunction(unary):
            return grpc.stream_unary_rpc_method_handler(
                _unary_reply(read, unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        streaming = handler.unary_stream
        if streaming is not None and (
            inspect.isasyncgenfunction(streaming) or inspect.iscoroutinefunction(streaming)
        ):
            return grpc.stream_stream_rpc_method_handler(
                _stream_replies(read, streaming),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # a synchronous handler: left to grpc's own dispatch

    async def _request(self, method: str, context: Context) -> Any:
        """The call's one request message; cancels the call when none arrived."""
        client = client_of(context.peer())  # asked first: a refused call no longer names it
        request = await context.read()
        if request is not grpc.aio.EOF:
            return request
        remaining = context.time_remaining()
        if remaining is None or remaining > 0:  # a passed deadline is no refusal
            self._limit_log.refused(
                MESSAGE_LIMIT,
                client,
                "request message not received: larger than the gRPC maximum, "
                "or cancelled by the client",
                max=self._max_bytes,
                server=self._server,
                method=method,
            )
        # What grpc itself does with a unary call whose request never came: end it without
        # an answer of our own (the client already has grpc's status).
        raise asyncio.CancelledError


def _unary_reply(read: ReadRequest, behaviour: Callable[..., Any]) -> Callable[..., Any]:
    # `requests` stays unused: read() takes the one message straight from the call.
    async def call(requests: AsyncIterator[Any], context: Context) -> Any:
        return await behaviour(await read(context), context)

    return call


def _stream_replies(read: ReadRequest, behaviour: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(behaviour):
        # Writer style (the handler calls context.write itself, as health's Watch does).
        async def write(requests: AsyncIterator[Any], context: Context) -> None:
            await behaviour(await read(context), context)

        return write

    async def replies(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
        request = await read(context)
        # aclosing: the handler's own cleanup runs when the client goes away mid-stream.
        async with contextlib.aclosing(behaviour(request, context)) as inner:
            async for reply in inner:
                yield reply

    return replies


class AddressInUseError(PeermirrorError, OSError):
    """The listening address is taken (or cannot be bound); names the address."""

    def __init__(self, address: str, reason: str = "address already in use") -> None:
        super().__init__(f"cannot listen on {address}: {reason}")
        self.address = address


AddServicer = Callable[[grpc.aio.Server], None]


def _unix_path(address: str) -> str | None:
    if address.startswith("unix://"):
        return address[len("unix://") :]
    if address.startswith("unix:"):
        return address[len("unix:") :]
    return None


def _unix_socket_in_use(path: str) -> bool:
    # gRPC unlinks an existing socket file before binding, which would silently take the path
    # from a live server; probe it first so that case fails like a taken TCP port.
    if not Path(path).exists():
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


class GrpcServer:
    """A ``grpc.aio`` server with standard health and reflection services.

    Usage: ``server = GrpcServer("127.0.0.1:5002", name="discovery-local")``; then
    ``server.add_service(full_name, lambda s: add_FooServicer_to_server(impl, s))`` per service;
    ``await server.start()``; later ``await server.stop()``.
    """

    def __init__(
        self,
        address: str,
        *,
        name: str = "grpc",
        options: Iterable[tuple[str, int | str]] = (),
        credentials: grpc.ServerCredentials | None = None,
        max_message_bytes: int | None = None,
        limit_log: LimitLog | None = None,
    ) -> None:
        self.address = address
        self.name = name
        # TLS credentials for listeners facing other nodes; None = plaintext (node-local APIs).
        self._credentials = credentials
        # grpc.max_message_bytes of the node config; None = that key's default.
        self.max_message_bytes = message_limit(max_message_bytes)
        self._options: list[tuple[str, int | str]] = [
            *SERVER_OPTIONS,
            # Explicit rather than grpc's implicit default: a larger message is refused with
            # RESOURCE_EXHAUSTED before it is parsed.
            ("grpc.max_receive_message_length", self.max_message_bytes),
            *options,
        ]
        self._refusals = MessageRefusalLog(
            name, self.max_message_bytes, limit_log or LimitLog(__name__)
        )
        self._adders: list[AddServicer] = []
        self._service_names: list[str] = []
        self._server: grpc.aio.Server | None = None
        self._health: health_aio.HealthServicer | None = None
        self._port = 0
        self._stopped = False
        self._stopping: asyncio.Future[None] | None = None

    @property
    def port(self) -> int:
        """The bound TCP port (resolved when the address asked for port 0); 0 for unix sockets."""
        return self._port

    @property
    def bound_address(self) -> str:
        """The address clients should dial (the real port substituted for port 0)."""
        if _unix_path(self.address) is not None:
            return self.address
        host = self.address.rsplit(":", 1)[0]
        if host in ("", "0.0.0.0", "[::]"):
            host = "127.0.0.1"
        return f"{host}:{self._port}"

    @property
    def service_names(self) -> list[str]:
        """Full names of the services registered by callers (not health/reflection)."""
        return list(self._service_names)

    def add_service(self, full_name: str, add: AddServicer) -> None:
        """Register a servicer: ``add(server)`` attaches it, ``full_name`` is listed by reflection
        and gets its own health status."""
        if self._server is not None:
            raise RuntimeError("add_service() must be called before start()")
        self._adders.append(add)
        self._service_names.append(full_name)

    async def start(self, *, serving: bool = True) -> int:
        """Bind and start serving; returns the bound port (0 for unix sockets).

        Health for the server as a whole ("") and each registered service starts as SERVING, or
        NOT_SERVING with ``serving=False`` for services that become ready later.
        Raises :class:`AddressInUseError` when the address cannot be bound.
        """
        if self._server is not None:
            raise RuntimeError("server already started")
        unix = _unix_path(self.address)
        if unix is not None and _unix_socket_in_use(unix):
            raise AddressInUseError(self.address, "a server is already listening on this socket")

        # The refusal log outermost: it must see a refused request before any handler runs.
        server = grpc.aio.server(
            options=self._options, interceptors=[self._refusals, ErrorStatuses()]
        )
        health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        for add in self._adders:
            add(server)
        reflection.enable_server_reflection(
            [*self._service_names, HEALTH_SERVICE_NAME, REFLECTION_SERVICE_NAME], server
        )
        try:
            if self._credentials is None:
                port = server.add_insecure_port(self.address)
            else:
                port = server.add_secure_port(self.address, self._credentials)
        except RuntimeError as exc:  # grpcio raises on bind failure
            await server.stop(None)
            raise AddressInUseError(
                self.address, f"address already in use or not bindable ({exc})"
            ) from None
        if port == 0 and unix is None:
            # Older grpcio signalled a failed bind by returning port 0.
            await server.stop(None)
            raise AddressInUseError(self.address)

        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for svc in ["", *self._service_names]:
            await health.set(svc, status)
        await server.start()
        self._server, self._health, self._port = server, health, port if unix is None else 0
        _log.info(
            "grpc server listening",
            server=self.name,
            address=self.bound_address,
            services=self._service_names,
        )
        return self._port

    async def set_serving(self, service: str, serving: bool) -> None:
        """Set the health status of ``service`` ("" = the server as a whole)."""
        if self._health is None:
            raise RuntimeError("server not started")
        await self._health.set(
            service,
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING,
        )

    async def stop(self, grace: float | None = DEFAULT_GRACE) -> None:
        """Report NOT_SERVING, stop accepting RPCs, give in-flight ones ``grace`` seconds.

        Idempotent; a no-op before start.
        """
        if self._server is None or self._stopped:
            return
        self._stopped = True
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        # Waited on, never cancelled: grpc's shutdown cut short leaves the core server half
        # stopped. Past the bound (a handler ignoring its cancel keeps the core from finishing)
        # it completes in the background and the caller goes on.
        self._stopping = asyncio.ensure_future(self._server.stop(grace))
        done, _ = await asyncio.wait({self._stopping}, timeout=(grace or 0.0) + SHUTDOWN_MARGIN)
        if not done:
            _log.error(
                "grpc server did not finish stopping in time; going on without it",
                server=self.name,
                address=self.bound_address,
                grace_s=grace,
            )
            return
        self._stopping.result()
        _log.info("grpc server stopped", server=self.name, address=self.bound_address)

    async def wait_for_termination(self) -> None:
        """Return when the server has stopped."""
        if self._server is not None:
            await self._server.wait_for_termination()

    async def __aenter__(self) -> GrpcServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def install_sigterm(
    loop: asyncio.AbstractEventLoop,
    stop_cb: Callable[[signal.Signals], None],
    signals: Iterable[signal.Signals] = STOP_SIGNALS,
) -> Callable[[], None]:
    """Call ``stop_cb(signum)`` on the loop when SIGTERM/SIGINT arrives.

    Returns a function that removes the handlers again (restoring default behaviour).
    """
    installed = list(signals)
    for sig in installed:
        loop.add_signal_handler(sig, stop_cb, sig)

    def remove() -> None:
        for sig in installed:
            loop.remove_signal_handler(sig)

    return remove


async def run_until_signal(
    on_stop: Callable[[], Awaitable[None]],
    *,
    work: Awaitable[object] | None = None,
    stop_timeout: float = STOP_TIMEOUT,
    signals: Iterable[signal.Signals] = STOP_SIGNALS,
) -> signal.Signals | None:
    """Wait for SIGTERM/SIGINT (or for ``work`` to end), then run ``on_stop`` within the budget.

    Returns the signal received, or None when ``work`` ended first. ``work`` (if still running)
    is cancelled after ``on_stop``; an exception raised by ``work`` is re-raised after the stop.
    ``on_stop`` overrunning ``stop_timeout`` is cancelled and logged, so the process can still
    exit in time.
    """
    loop = asyncio.get_running_loop()
    received: asyncio.Future[signal.Signals] = loop.create_future()

    def on_signal(sig: signal.Signals) -> None:
        if not received.done():
            received.set_result(sig)

    installed = list(signals)
    install_sigterm(loop, on_signal, installed)
    work_task: asyncio.Future[object] | None = (
        asyncio.ensure_future(work) if work is not None else None
    )
    sig: signal.Signals | None = None
    try:
        waiters: list[asyncio.Future[object]] = [received]  # type: ignore[list-item]
        if work_task is not None:
            waiters.append(work_task)
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if received.done():
            sig = received.result()
            _log.info("stop signal received", signal=sig.name)
        try:
            await asyncio.wait_for(on_stop(), timeout=stop_timeout)
        except TimeoutError:
            _log.error("graceful stop overran its budget", budget_s=stop_timeout)
    finally:
        # Later stop signals are ignored until the loop closes, not given back their default
        # (fatal) action: a SIGKILLed node's children can be sent their parent-death SIGTERM
        # more than once (once per exiting thread of the node), and a second one must not kill
        # a service in its last steps, before it has said it stopped. Ignored by the kernel,
        # not by an asyncio handler: the loop's close() closes its wakeup socket before it
        # removes its signal handlers, and a signal in between made CPython print "Exception
        # ignored when trying to write to the signal wakeup fd" (EBADF) on the service's
        # stderr. close() still restores the default actions at the end.
        for late in installed:
            signal.signal(late, signal.SIG_IGN)
        if work_task is not None and not work_task.done():
            work_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work_task
    if work_task is not None and work_task.done() and not work_task.cancelled():
        exc = work_task.exception()
        if exc is not None:
            raise exc
    return sig
