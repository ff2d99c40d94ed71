"""Sanic's HTTP/1.1 protocol, refusing TLS handshakes on the plain-HTTP listener at once.

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
