"""A small, slow upstream registry on loopback for in-flight tests, and a client for it.

It serves manifests, and blobs at ``/v2/<name>/blobs/<digest>`` (Range included) in pieces:
the first `head_bytes` at once, the rest only after the test opens `gate`, so a test can hold
a fetch in flight for as long as it needs. It records the requests it answered. The client
implements the coordinator's UpstreamFetcher over plain HTTP (until the real upstream client
is wired).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from services.registry.inflight.ports import UpstreamManifest
from services.registry.ranges import ByteRange, parse_range

PIECE = 64 * 1024


@dataclass
class SlowUpstream:
    """The server's content and behaviour; `requests` lists (path, Range header) answered."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    # Reference (tag or digest) -> (media type, body).
    manifests: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    manifest_delay: float = 0.0
    # Seconds before a blob answer's headers (an upstream's token round and first byte).
    blob_delay: float = 0.0
    head_bytes: int = 256 * 1024
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    # Digests whose body is served with its first byte flipped (a corrupt upstream).
    corrupt: set[str] = field(default_factory=set)
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    # One link shared by every connection (bytes per second; None = unthrottled), like an
    # upstream's egress or a site's uplink.
    rate: float | None = None
    # Body bytes sent, all requests together (what an upstream byte counter would show).
    bytes_sent: int = 0
    port: int = 0
    _link_free_at: float = 0.0

    async def _throttle(self, size: int) -> None:
        if self.rate is None:
            return
        loop = asyncio.get_running_loop()
        start = max(loop.time(), self._link_free_at)
        self._link_free_at = start + size / self.rate
        # The simulated link's transfer time: the slowness is what this upstream is for.
        await asyncio.sleep(self._link_free_at - loop.time())

    async def _manifest(self, request: web.Request) -> web.Response:
        reference = request.match_info["reference"]
        self.requests.append((request.path, None))
        # A slow manifest answer on purpose: the delay is the upstream this fake plays.
        await asyncio.sleep(self.manifest_delay)
        found = self.manifests.get(reference)
        if found is None:
            return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status=404)
        media_type, body = found
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        return web.Response(
            body=body, content_type=media_type, headers={"Docker-Content-Digest": digest}
        )

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        self.requests.append((request.path, request.headers.get("Range")))
        # A slow first answer on purpose, as manifest_delay.
        await asyncio.sleep(self.blob_delay)
        data = self.blobs.get(digest)
        if data is None:
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)
        if digest in self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        selected = parse_range(request.headers.get("Range"), len(data))
        span = selected if isinstance(selected, ByteRange) else None
        start, end = (0, len(data)) if span is None else (span.start, span.end + 1)
        response = web.StreamResponse(status=200 if span is None else 206)
        response.content_length = end - start
        if span is not None:
            response.headers["Content-Range"] = span.content_range()
        await response.prepare(request)
        position = start
        while position < end:
            if position >= self.head_bytes:
                await self.gate.wait()
            piece_end = min(end, position + PIECE)
            await self._throttle(piece_end - position)
            await response.write(data[position:piece_end])
            self.bytes_sent += piece_end - position
            position = piece_end
        await response.write_eof()
        return response


@contextlib.asynccontextmanager
async def serve_slow_upstream(upstream: SlowUpstream) -> AsyncIterator[SlowUpstream]:
    """Serve `upstream` on a free loopback port until the block exits."""
    app = web.Application()
    app.router.add_get("/v2/{name:.+}/blobs/{digest}", upstream._blob)
    app.router.add_get("/v2/{name:.+}/manifests/{reference}", upstream._manifest)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    upstream.port = runner.addresses[0][1]
    try:
        yield upstream
    finally:
        upstream.gate.set()
        await runner.cleanup()


class _Body:
    def __init__(self, response: aiohttp.ClientResponse, size: int) -> None:
        self._response = response
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    async def chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self._response.content.iter_chunked(PIECE):
            yield chunk

    async def aclose(self) -> None:
        self._response.close()


class SlowUpstreamClient:
    """UpstreamFetcher for a SlowUpstream on 127.0.0.1."""

    def __init__(self, port: int) -> None:
        self._base = f"http://127.0.0.1:{port}"
        self._session = aiohttp.ClientSession()

    async def fetch_blob(self, registry: str, repository: str, digest: str, offset: int) -> _Body:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        response = await self._session.get(
            f"{self._base}/v2/{repository}/blobs/{digest}", headers=headers
        )
        if response.status not in (200, 206):
            response.close()
            raise ConnectionError(f"upstream answered {response.status}")
        content_range = response.headers.get("Content-Range")
        if content_range is not None:
            size = int(content_range.rpartition("/")[2])
        else:
            size = int(response.headers["Content-Length"])
        return _Body(response, size)

    async def fetch_manifest(
        self, registry: str, repository: str, reference: str
    ) -> UpstreamManifest:
        async with self._session.get(
            f"{self._base}/v2/{repository}/manifests/{reference}"
        ) as response:
            if response.status != 200:
                raise ConnectionError(f"upstream answered {response.status}")
            return UpstreamManifest(
                response.headers["Docker-Content-Digest"],
                await response.read(),
                response.content_type,
            )

    async def close(self) -> None:
        await self._session.close()
