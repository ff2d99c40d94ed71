"""A streaming response from an upstream registry: status, headers, paced and counted bytes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from multidict import CIMultiDictProxy

from services.common.closing import AsyncClosing
from services.registry.upstream.errors import UpstreamUnavailable
from services.registry.upstream.routes import UpstreamRoute

# containerd refuses manifests larger than this (MaxManifestSize in remotes/docker).
MAX_MANIFEST_BYTES = 4 * 1024 * 1024


class UpstreamBody(AsyncClosing):
    """What an endpoint answered: headers now, body bytes as they arrive.

    The bytes always start at `offset` of the content: when an endpoint ignores a Range and
    sends the whole blob (200), the bytes before `offset` are skipped here. `received` counts
    delivered bytes, so a broken body can be resumed at `offset + received`. Close it (or use
    ``async with``) to release the connection and this node's upstream slot.
    """

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        route: UpstreamRoute,
        *,
        offset: int,
        skip: int,
        on_bytes: Callable[[int], object],
        pace: Callable[[int], Awaitable[None]],
        on_close: Callable[[], None],
        head: bool = False,
    ) -> None:
        self._response = response
        self.route = route
        self.status = response.status
        self.headers: CIMultiDictProxy[str] = response.headers
        self.url = str(response.url)
        self.offset = offset
        self.received = 0
        self.head = head
        self._skip = skip
        self._on_bytes = on_bytes
        self._pace = pace
        self._on_close = on_close
        self._closed = False

    @property
    def digest(self) -> str | None:
        """`Docker-Content-Digest` as sent (unverified: the caller hashes the bytes)."""
        return self.headers.get("Docker-Content-Digest")

    @property
    def media_type(self) -> str | None:
        value = self.headers.get("Content-Type")
        return value.split(";", 1)[0].strip() if value else None

    @property
    def length(self) -> int | None:
        """Bytes this body delivers from `offset` (None when the endpoint did not say)."""
        text = self.headers.get("Content-Length")
        if text is None or not text.isdigit():
            return None
        return int(text) - self._skip

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body from `offset` on; a broken stream raises UpstreamUnavailable. The body is
        closed (slot released) once the last byte is read or the stream broke."""
        if self.head or self._closed:
            return
        try:
            async for chunk in self._response.content.iter_any():
                if self._skip:
                    dropped = min(self._skip, len(chunk))
                    self._skip -= dropped
                    self._on_bytes(dropped)
                    chunk = chunk[dropped:]
                    if not chunk:
                        continue
                await self._pace(len(chunk))
                self._on_bytes(len(chunk))
                self.received += len(chunk)
                yield chunk
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.close()
            raise UpstreamUnavailable(
                f"upstream body from {self.route.host} broke after {self.received} bytes: {exc}"
            ) from exc
        self.close()
        if self._skip:
            raise UpstreamUnavailable(f"upstream body from {self.route.host} ended before offset")

    async def read(self, limit: int = MAX_MANIFEST_BYTES) -> bytes:
        """The whole body (manifests); UpstreamUnavailable when it exceeds `limit`."""
        parts: list[bytes] = []
        size = 0
        async for chunk in self.chunks():
            size += len(chunk)
            if size > limit:
                self.close()
                raise UpstreamUnavailable(f"upstream body from {self.route.host} over {limit} B")
            parts.append(chunk)
        return b"".join(parts)

    def close(self) -> None:
        """Release the connection and the upstream slot (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._response.release()
        self._on_close()
