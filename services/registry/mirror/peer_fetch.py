"""The registry's HTTP client to peers' registries: pooled per peer, one hop, nothing else.

Every request carries the peer header (the peer answers from its own content only, so a relay is
never relayed again), follows no redirect, ignores proxy settings and never decompresses. The
upstream registry travels only as the ``ns`` query parameter: it is never dialled.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping

import aiohttp
from yarl import URL

from services.common.request_id import outgoing_headers
from services.registry.headers import PEER_HEADER, PEER_HEADER_VALUE
from services.registry.mirror.hedging import Peer

# Idle connections per peer kept for the next request; a hedge or failover needs a fresh one
# rarely enough that more would only hold sockets.
POOL_PER_PEER = 16
KEEPALIVE_S = 30.0
READ_BUFFER = 1024 * 1024


def peer_url(
    peer: Peer, name: str, segment: str, reference: str, registry: str, *, tls: bool = False
) -> URL:
    """``http(s)://<peer>/v2/<name>/<segment>/<reference>?ns=<registry>``."""
    return URL.build(
        scheme="https" if tls else "http",
        host=peer.address,
        port=peer.port,
        path=f"/v2/{name}/{segment}/{reference}",
        query={"ns": registry},
    )


class PeerClient:
    """One aiohttp session for all peers (its connector pools connections per peer)."""

    def __init__(self, peer_timeout: float, ssl_context: ssl.SSLContext | None = None) -> None:
        self.peer_timeout = peer_timeout
        # Mutual TLS (tls.enabled): this node's certificate is presented and the peer's must be
        # from the cluster CA and name the peer's IP address. None = plain HTTP.
        self.ssl_context = ssl_context
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=0,
                limit_per_host=POOL_PER_PEER,
                keepalive_timeout=KEEPALIVE_S,
                # Peers are IP literals; nothing here is ever resolved through DNS.
                use_dns_cache=False,
                ssl=self.ssl_context if self.ssl_context is not None else False,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                # A stalled peer (no headers, or no next body bytes) is given up after this.
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=self.peer_timeout, sock_read=self.peer_timeout
                ),
                auto_decompress=False,
                # Larger socket reads: fewer, bigger pieces through the relay's Python loop.
                read_bufsize=READ_BUFFER,
                trust_env=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding"),
                headers={PEER_HEADER: PEER_HEADER_VALUE, "User-Agent": "peermirror-registry"},
            )
        return self._session

    async def request(
        self,
        method: str,
        peer: Peer,
        name: str,
        segment: str,
        reference: str,
        registry: str,
        headers: Mapping[str, str] | None = None,
    ) -> aiohttp.ClientResponse:
        """Send one request and return once the response headers are in; the caller must
        release or close the response."""
        return await self._open().request(
            method,
            peer_url(peer, name, segment, reference, registry, tls=self.ssl_context is not None),
            # The request id lets the peer's log line be matched to this node's.
            headers={**outgoing_headers(), **(headers or {})},
            allow_redirects=False,
        )

    def request_headers(self) -> dict[str, str]:
        """The headers of a request to a peer sent outside the session (see peer_socket)."""
        return {
            PEER_HEADER: PEER_HEADER_VALUE,
            "User-Agent": "peermirror-registry",
            # The request id lets the peer's log line be matched to this node's.
            **outgoing_headers(),
        }

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()
