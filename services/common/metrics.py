"""Shared Prometheus pieces: metric naming, build info, key labels and the /metrics listener.

Every service keeps its metrics in its own ``CollectorRegistry`` (tests run several services in
one process). The registry serves ``/metrics`` on its HTTP port; discovery and pinner, which
speak only gRPC, serve it from :class:`MetricsListener`, a minimal asyncio HTTP server on the
service's own loop (no thread, so collectors read live state without locking).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import time
from collections.abc import Awaitable, Callable, Mapping

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Gauge,
    disable_created_metrics,
    generate_latest,
)

from services.common.config import parse_host_port
from services.common.hostport import join_host_port
from services.common.logsetup import get_logger
from services.common.oci.grammar import is_digest_syntax

PREFIX = "peermirror"
METRICS_PATH = "/metrics"
# Longest request head the listener reads; a scrape request is a few hundred bytes.
MAX_REQUEST_HEAD = 8192
# A client must send its request within this many seconds.
REQUEST_TIMEOUT = 5.0
# Most seconds a refresh (e.g. asking containerd) may hold up a scrape.
REFRESH_TIMEOUT = 2.0

log = get_logger(__name__)

# `*_created` samples double the exposition for a value no dashboard of ours reads.
disable_created_metrics()  # type: ignore[no-untyped-call]


def version() -> str:
    """peermirror's installed version ("unknown" when run from a tree that is not installed)."""
    try:
        return importlib.metadata.version("peermirror")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def new_registry(service: str) -> CollectorRegistry:
    """A registry for one service, with ``peermirror_build_info{service,version}`` (always 1)
    and ``peermirror_start_time_seconds`` (Unix time the service started)."""
    registry = CollectorRegistry(auto_describe=True)
    info = Gauge(
        f"{PREFIX}_build_info",
        "Always 1; labels name the service and peermirror version",
        ["service", "version"],
        registry=registry,
    )
    info.labels(service=service, version=version()).set(1)
    started = Gauge(
        f"{PREFIX}_start_time_seconds",
        "Unix time the service started",
        ["service"],
        registry=registry,
    )
    started.labels(service=service).set(time.time())
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition of `registry`."""
    return generate_latest(registry)


def key_labels(key: str) -> tuple[str, str]:
    """(registry, kind) of an advertised key: a digest (no registry of its own) or a tag key
    ``<registry>/<name>:<tag>``."""
    if is_digest_syntax(key):
        return "", "digest"
    registry, slash, _ = key.partition("/")
    return (registry if slash else ""), "tag"


def registry_of_image(name: str) -> str:
    """The registry host of a fully qualified image name (``docker.io/library/x:1``)."""
    first, slash, _ = name.partition("/")
    return first if slash else ""


Refresh = Callable[[], Awaitable[None]]
# Another page a listener serves next to /metrics: returns (content type, body).
Page = Callable[[], Awaitable[tuple[str, bytes]]]


class MetricsListener:
    """Serves ``GET /metrics`` of `registry` on `address` (host:port; port 0 picks one).

    `refresh`, when given, runs before each scrape (bounded by REFRESH_TIMEOUT) to update
    values that need an await to read. `pages` maps further paths (GET only) to what renders
    them, such as the registry's status page.
    """

    def __init__(
        self,
        address: str,
        registry: CollectorRegistry,
        *,
        refresh: Refresh | None = None,
        pages: Mapping[str, Page] | None = None,
    ) -> None:
        self.host, self.port = parse_host_port(address)
        self.registry = registry
        self.refresh = refresh
        self.pages = dict(pages or {})
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        """host:port listened on (the real port once started)."""
        return join_host_port(self.host, self.port)

    async def start(self) -> int:
        """Listen; returns the bound port. OSError when the address is taken."""
        self._server = await asyncio.start_server(self._serve, self.host or None, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            method, path = _request_line(head)
            path = path.split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                status, body, ctype = "405 Method Not Allowed", b"GET or HEAD only\n", "text/plain"
            elif path in self.pages:
                status, body, ctype = await self._page(self.pages[path])
            elif path != METRICS_PATH:
                status, body, ctype = "404 Not Found", b"try /metrics\n", "text/plain"
            else:
                await self._refresh()
                status, body, ctype = "200 OK", render(self.registry), CONTENT_TYPE_LATEST
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode("ascii")
            )
            if method != "HEAD":
                writer.write(body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _page(self, page: Page) -> tuple[str, bytes, str]:
        try:
            ctype, body = await page()
        except Exception as exc:  # one broken page must not take the listener down
            log.warning("page failed", error=f"{type(exc).__name__}: {exc}")
            return "500 Internal Server Error", b"page failed; see the service log\n", "text/plain"
        return "200 OK", body, ctype

    async def _refresh(self) -> None:
        if self.refresh is None:
            return
        try:
            async with asyncio.timeout(REFRESH_TIMEOUT):
                await self.refresh()
        except Exception as exc:  # a scrape still answers, with the last values
            log.warning("metrics refresh failed", error=f"{type(exc).__name__}: {exc}")


def _request_line(head: bytes) -> tuple[str, str]:
    line = head[:MAX_REQUEST_HEAD].split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split(" ")
    if len(parts) != 3:
        return "", ""
    return parts[0], parts[1]


async def start_listener(
    address: str,
    registry: CollectorRegistry,
    *,
    service: str,
    refresh: Refresh | None = None,
    pages: Mapping[str, Page] | None = None,
) -> MetricsListener | None:
    """Start a listener on `address` ("" = metrics off). A taken address is logged, not fatal:
    the service itself matters more than its metrics."""
    if not address:
        return None
    listener = MetricsListener(address, registry, refresh=refresh, pages=pages)
    try:
        await listener.start()
    except OSError as exc:
        log.error(
            "metrics listener could not start; serving without /metrics",
            service=service,
            address=address,
            error=exc.strerror or str(exc),
        )
        return None
    log.info("metrics listening", service=service, address=listener.address)
    return listener
