"""The node's UpstreamClient as the coordinator's UpstreamFetcher.

The client answers with headers and a streaming body; the coordinator needs the whole blob's
size before it reserves a spool (from ``Content-Range`` on a resumed fetch, else ``offset`` plus
the body's length) and a manifest's bytes, digest and media type. Its typed errors (auth, not
found, busy, unavailable) reach the coordinator as they are and become a fast 404 there; its
per-node caps are the node's back-to-source limits, so no second limiter is needed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from services.common.oci.media_types import detect_manifest_media_type, is_manifest_media_type
from services.registry.inflight.ports import UpstreamManifest
from services.registry.upstream import UpstreamBody, UpstreamClient, UpstreamUnavailable


def blob_size(body: UpstreamBody) -> int:
    """The whole blob's size as `body`'s headers tell it; UpstreamUnavailable when they do not."""
    content_range = body.headers.get("Content-Range")
    if body.status == 206 and content_range is not None:
        total = content_range.rpartition("/")[2].strip()
        if total.isdigit():
            return int(total)
    length = body.length
    if length is None:
        raise UpstreamUnavailable(f"upstream {body.url} sent no length for a blob")
    return body.offset + length


class _SizedBody:
    """An upstream blob body with its whole blob's size."""

    def __init__(self, body: UpstreamBody, size: int) -> None:
        self._body = body
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    def chunks(self) -> AsyncIterator[bytes]:
        return self._body.chunks()

    async def aclose(self) -> None:
        self._body.close()


class ClientFetcher:
    """UpstreamFetcher over `client` (the node's one UpstreamClient)."""

    def __init__(self, client: UpstreamClient) -> None:
        self.client = client

    async def fetch_blob(
        self, registry: str, repository: str, digest: str, offset: int
    ) -> _SizedBody:
        body = await self.client.fetch_blob(registry, repository, digest, offset)
        try:
            return _SizedBody(body, blob_size(body))
        except BaseException:
            body.close()
            raise

    async def fetch_manifest(
        self, registry: str, repository: str, reference: str
    ) -> UpstreamManifest:
        async with await self.client.fetch_manifest(registry, repository, reference) as body:
            data = await body.read()
            declared = body.media_type
        media_type = (
            declared
            if declared is not None and is_manifest_media_type(declared)
            else detect_manifest_media_type(data)
        )
        if media_type is None:
            raise UpstreamUnavailable(f"upstream {body.url} sent no manifest for {reference}")
        # The digest is checked against the bytes by the coordinator.
        return UpstreamManifest(body.digest or "", data, media_type)
