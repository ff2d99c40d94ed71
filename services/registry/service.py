"""Runs the registry: the Sanic HTTP app and its node-local gRPC server in one asyncio loop."""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import cast

from sanic.server.async_server import AsyncioServer

from services.common.config import NodeConfig
from services.common.grpc_server import AddressInUseError, GrpcServer, run_until_signal
from services.common.hostport import join_host_port
from services.common.logsetup import get_logger
from services.common.metrics import start_listener
from services.common.tls import server_context, tls_files
from services.registry.app import create_app
from services.registry.context import RegistryApp
from services.registry.http_protocols import PlainHttpProtocol, TlsHttpProtocol
from services.registry.introspection import register as register_introspection
from services.registry.limits import limit_log
from services.registry.status_page import listener_pages

# Leaves headroom inside the 5 s the node and kubelet allow between SIGTERM and exit.
STOP_BUDGET = 4.0
CONNECTION_DRAIN = 1.0

log = get_logger(__name__)


class HttpServer:
    """The Sanic app on our loop: bound before it accepts, lifecycle events run by hand."""

    def __init__(
        self, app: RegistryApp, host: str, port: int, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.app = app
        self.host = host
        self.port = port
        # With a context the listener speaks TLS only (client certificates as it requires).
        self.ssl_context = ssl_context
        self._server: AsyncioServer | None = None
        self._listener: asyncio.Server | None = None

    @property
    def address(self) -> str:
        """host:port actually listened on (the real port when 0 was asked for)."""
        return join_host_port(self.host, self.port)

    async def start(self) -> None:
        """Bind, run Sanic's startup events, then start accepting connections."""
        sock: socket.socket | None = None
        try:
            if self.port == 0:
                # Sanic reads port 0 as "its default port" (8000): bind an ephemeral one here.
                sock = socket.create_server(
                    (self.host, 0), family=socket.AF_INET6 if ":" in self.host else socket.AF_INET
                )
            server = await self.app.create_server(
                host=None if sock else self.host,
                port=None if sock else self.port,
                sock=sock,
                return_asyncio_server=True,
                ssl=self.ssl_context,
                # The TLS-refusing protocol is for the plain listener only.
                protocol=PlainHttpProtocol if self.ssl_context is None else TlsHttpProtocol,
                # Accept nothing until the router is finalized by startup() below.
                asyncio_server_kwargs={"start_serving": False},
            )
        except OSError as exc:
            if sock is not None:
                sock.close()
            raise AddressInUseError(self.address, exc.strerror or str(exc)) from None
        assert server is not None
        # Sanic's AsyncioServer is untyped: its `server` is the bound asyncio.Server.
        listener = cast(asyncio.Server, server.server)
        self._server, self._listener = server, listener
        if listener.sockets:
            self.port = int(listener.sockets[0].getsockname()[1])
        await server.startup()  # type: ignore[no-untyped-call]
        await server.before_start()  # type: ignore[no-untyped-call]
        await listener.start_serving()
        await server.after_start()  # type: ignore[no-untyped-call]

    async def stop(self) -> None:
        """Stop accepting, let idle keep-alive connections go, then close the rest."""
        server, listener = self._server, self._listener
        if server is None or listener is None:
            return
        self._server = self._listener = None
        await server.before_stop()  # type: ignore[no-untyped-call]
        listener.close()
        busy = [conn for conn in list(server.connections) if not conn.close_if_idle()]
        if busy:
            # Give responses in flight a moment to finish before cutting them off.
            await asyncio.sleep(CONNECTION_DRAIN)
            for conn in busy:
                conn.close()
        await listener.wait_closed()
        await server.after_stop()  # type: ignore[no-untyped-call]


async def run(cfg: NodeConfig) -> None:
    """Serve until SIGTERM/SIGINT, then stop within the budget."""
    files = tls_files(cfg)
    ssl_context = server_context(files) if files is not None else None
    app = create_app(cfg, shared_first_pulls=True)
    grpc_server = GrpcServer(
        cfg.registry.grpc_address,
        name="registry-introspection",
        max_message_bytes=cfg.grpc.max_message_bytes,
        limit_log=limit_log,
    )
    register_introspection(grpc_server, app.ctx.stats)
    http = HttpServer(app, cfg.registry.host, cfg.registry.port, ssl_context)
    await grpc_server.start()
    try:
        await http.start()
    except BaseException:
        await grpc_server.stop(grace=None)
        raise
    app.ctx.ready = True
    log.info(
        "registry started",
        node=cfg.node.name,
        http_address=http.address,
        grpc_address=grpc_server.bound_address,
        tls=files is not None,
    )
    if files is None:
        log.warning(
            "tls.enabled is false: the registry serves plain HTTP without client "
            "certificates; any host that reaches this port can read every image (development "
            "and demo only)",
            node=cfg.node.name,
        )
    if not cfg.k3s.takes_part:
        log.warning(
            "K3s embedded-registry is false: this node takes no part, every mirror request is "
            "answered 404",
            node=cfg.node.name,
        )

    assert app.ctx.metrics is not None
    # The node-local listener also serves the status page (/status, /status.json).
    metrics = await start_listener(
        cfg.registry.metrics_address,
        app.ctx.metrics.registry,
        service="registry",
        pages=listener_pages(app.ctx),
    )

    async def stop() -> None:
        app.ctx.ready = False
        if metrics is not None:
            await metrics.stop()
        await asyncio.gather(http.stop(), grpc_server.stop())

    await run_until_signal(stop, stop_timeout=STOP_BUDGET)
    log.info("registry stopped")
