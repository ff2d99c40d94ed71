"""Where a joining node finds its first peers: static addresses, a DNS name, a peer-list URL.

Every source yields IP endpoints (host names are resolved here, all A/AAAA records), so the
contacts built from them carry addresses, as contacts learned from the network do.
Parsing is pure; `gather_endpoints` does the I/O (DNS through the event loop's resolver, the
URL through urllib in a worker thread, which keeps aiohttp out of the service's memory).
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field

from services.common.config import parse_host_port
from services.common.hostport import join_host_port
from services.discovery.wire import normalize_ip

# Bootstrap retries: 1 s, 2 s, 4 s ... capped, with jitter so a cluster restarting at once
# does not retry in lockstep.
BACKOFF_BASE = 1.0
BACKOFF_CAP = 30.0
# A peer-list response larger than this is not a peer list.
MAX_PEER_LIST_BYTES = 1 << 20
READ_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True, order=True)
class BootstrapEndpoint:
    """An IP address and TCP port of a Peer service."""

    address: str
    port: int

    def __str__(self) -> str:
        return join_host_port(self.address, self.port)


def parse_peer_entry(text: str, default_port: int) -> tuple[str, int]:
    """One peer-list entry as (host, port): "host:port", "[v6]:port", a bare host or IP
    (the default port), or a multiaddr such as "/ip4/10.0.0.1/tcp/5001/p2p/..." as Spegel
    and K3s publish. Raises ValueError."""
    entry = text.strip()
    if not entry:
        raise ValueError("empty peer address")
    if entry.startswith("/"):
        return _parse_multiaddr(entry, default_port)
    ip = normalize_ip(entry)
    if ip is not None:
        # A bare IPv4 or IPv6 address (IPv6 bracketed or not; with a port it must be bracketed).
        return ip, default_port
    if ":" not in entry:
        return entry, default_port
    host, port = parse_host_port(entry)
    if not host:
        raise ValueError(f"peer address without host: {text!r}")
    if port == 0:
        raise ValueError(f"peer address with port 0: {text!r}")
    return host, port


def _parse_multiaddr(entry: str, default_port: int) -> tuple[str, int]:
    parts = entry.strip("/").split("/")
    host: str | None = None
    port = default_port
    for name, value in zip(parts[::2], parts[1::2], strict=False):
        if name in ("ip4", "ip6", "dns", "dns4", "dns6") and host is None:
            host = value
        elif name == "tcp" and value.isdigit() and 0 < int(value) <= 65535:
            port = int(value)
    if host is None:
        raise ValueError(f"multiaddr without an ip4/ip6/dns part: {entry!r}")
    return host, port


def parse_peer_list(body: bytes, default_port: int) -> list[tuple[str, int]]:
    """A peer-list document (JSON list of address strings, like K3s's /v1-k3s/p2p).
    Entries that cannot be parsed are skipped; a document that is not a list raises."""
    data = json.loads(body)
    if not isinstance(data, list):
        raise ValueError("peer list is not a JSON list")
    out: list[tuple[str, int]] = []
    for item in data:
        if not isinstance(item, str):
            continue
        try:
            out.append(parse_peer_entry(item, default_port))
        except ValueError:
            continue
    return out


def backoff_delay(attempt: int, rng: random.Random | None = None) -> float:
    """Seconds to wait before bootstrap attempt `attempt + 1` (attempt counts from 0)."""
    delay = min(BACKOFF_CAP, BACKOFF_BASE * (2.0 ** min(attempt, 16)))
    jitter = (rng or random).uniform(0.8, 1.2)
    return float(min(BACKOFF_CAP, delay * jitter))


@dataclass(frozen=True)
class BootstrapSources:
    """The configured sources; `default_port` applies to entries without a port."""

    peers: Sequence[str] = ()
    dns: str | None = None
    url: str | None = None
    default_port: int = 5001
    url_timeout: float = 5.0

    @property
    def configured(self) -> bool:
        """Whether any source is set (a node without one runs as a single-node cluster)."""
        return bool(self.peers) or bool(self.dns) or bool(self.url)


@dataclass
class Gathered:
    """Endpoints found and what went wrong on the way (one line per failed source)."""

    endpoints: list[BootstrapEndpoint] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


async def resolve(host: str, port: int) -> list[BootstrapEndpoint]:
    """Every A/AAAA address of `host` (an IP resolves to itself)."""
    ip = normalize_ip(host)
    if ip is not None:
        return [BootstrapEndpoint(ip, port)]
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    found: list[BootstrapEndpoint] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = normalize_ip(str(sockaddr[0]))
        if address is not None:
            found.append(BootstrapEndpoint(address, port))
    return found


# No proxy from the environment: the peer list is served inside the cluster.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _fetch(url: str, timeout: float) -> bytes:
    # `timeout` bounds the whole fetch, not only each socket read: a list trickling in must
    # not keep this worker thread alive, since the event loop's shutdown waits for it.
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    size = 0
    with _opener.open(url, timeout=timeout) as response:
        while size <= MAX_PEER_LIST_BYTES:
            chunk: bytes = response.read1(READ_CHUNK)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if time.monotonic() > deadline:
                raise TimeoutError(f"peer list not received within {timeout} s")
    if size > MAX_PEER_LIST_BYTES:
        raise ValueError(f"peer list larger than {MAX_PEER_LIST_BYTES} bytes")
    return b"".join(chunks)


async def gather_endpoints(sources: BootstrapSources) -> Gathered:
    """Asks every configured source; failures are reported, not raised."""
    result = Gathered()
    named: list[tuple[str, int, str]] = []  # (host, port, source)
    for entry in sources.peers:
        try:
            host, port = parse_peer_entry(entry, sources.default_port)
        except ValueError as exc:
            result.problems.append(f"bootstrap_peers {entry!r}: {exc}")
            continue
        named.append((host, port, f"bootstrap_peers {entry!r}"))
    if sources.dns:
        try:
            host, port = parse_peer_entry(sources.dns, sources.default_port)
            named.append((host, port, f"bootstrap_dns {sources.dns!r}"))
        except ValueError as exc:
            result.problems.append(f"bootstrap_dns {sources.dns!r}: {exc}")
    if sources.url:
        try:
            body = await asyncio.to_thread(_fetch, sources.url, sources.url_timeout)
            listed = parse_peer_list(body, sources.default_port)
            named.extend((h, p, f"bootstrap_url {sources.url!r}") for h, p in listed)
        except (OSError, ValueError) as exc:
            result.problems.append(f"bootstrap_url {sources.url!r}: {exc}")

    async def one(host: str, port: int, source: str) -> list[BootstrapEndpoint]:
        try:
            return await resolve(host, port)
        except OSError as exc:
            result.problems.append(f"{source}: cannot resolve {host!r}: {exc}")
            return []

    resolved = await asyncio.gather(*(one(h, p, s) for h, p, s in named))
    result.endpoints = sorted({e for batch in resolved for e in batch})
    return result
