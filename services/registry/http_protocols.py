"""Sanic's HTTP/1.1 protocol for each listener: the plain one refuses TLS handshakes at once;
the TLS one lets asyncio's TLS shutdown send every queued byte before a connection goes.

Clients told to skip TLS verification (skopeo, containers/image) try https first and fall back to
http only when that fails. A ClientHello sent to a plain-HTTP server otherwise sits in the request
buffer until the client's TLS timeout (10 s); closing the connection on its first byte (0x16, a
TLS handshake record, which no HTTP request line starts with) makes the fallback immediate.
"""

from __future__ import annotations

from sanic.server.protocols.http_protocol import HttpProtocol


class PlainHttpProtocol(HttpProtocol):
    """HttpProtocol that closes connections opening with a TLS handshake."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and data[:1] == b"\x16" and not self.recv_buffer:
            transport.close()
            return
        super().data_received(data)


class TlsHttpProtocol(HttpProtocol):
    """HttpProtocol whose close() leaves the connection to asyncio's TLS shutdown.

    Sanic's close() aborts a closing connection as soon as its transport reports nothing
    queued and writing is not paused. A TLS transport reports only what its TLS layer holds,
    not what the socket transport under it has still to send, so an answer's last records
    could be dropped when the server closed right after it (the client asked it to). asyncio's
    TLS shutdown sends everything queued, then close_notify, and gives up by itself after its
    shutdown timeout; the abort here is only a backstop for a connection still open after
    Sanic's TCP close timeout.
    """

    __slots__ = ()

    def close(self, timeout: float | None = None) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.close()
        grace = self.app.config.GRACEFUL_TCP_CLOSE_TIMEOUT if timeout is None else timeout
        self.loop.call_later(grace, self._abort_if_open)

    def _abort_if_open(self) -> None:
        if self.transport is not None and not (self.conn_info and self.conn_info.lost):
            self.abort()  # type: ignore[no-untyped-call]
