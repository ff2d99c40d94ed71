"""The registry's HTTP side of shared first pulls: answers from spools, and the waiter's loop.

Two hooks of the /v2/ handlers call in here:

- :func:`answer_peer`: a peer's request (served from local content only) that missed locally is
  answered from an in-flight spool or the manifest window when there is one. Blob bytes not
  written yet are waited for, Range works at any offset, HEAD answers the blob's size and digest;
  a blob or manifest this node has claimed but not yet had an upstream answer for is waited for
  too.
- :func:`answer_local_miss`: a local client's miss that no peer served goes to the coordinator;
  while another node holds the lease, the peer relay is tried again until the holder serves it
  or its lease passes to this node (then this node fetches), within ``inflight.holder_wait``.

Every spool answer holds its last chunk back until the blob is verified: a body that turns out
wrong is cut short of its Content-Length, never completed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from sanic import HTTPResponse, Request

from services.common.oci.errors import ErrorCode, OciError
from services.common.oci.grammar import normalize_name
from services.registry.headers import blob_headers, manifest_headers, select_range
from services.registry.inflight.coordinator import (
    BlobClaim,
    Coordinator,
    Fetching,
    ManifestClaim,
    Unavailable,
)
from services.registry.inflight.ports import UpstreamManifest
from services.registry.inflight.spool import Spool
from services.registry.inflight.spool_state import SpoolFailedError
from services.registry.paths import Kind, Route
from services.registry.transfer import ClientGoneError, body_sent_outside_sanic, send_chunks

AnyRequest = Request[Any, Any]
Relay = Callable[[], Awaitable[HTTPResponse | None]]


class SpoolAbortedError(ClientGoneError):
    """A spool failed mid-answer, so the client connection was cut short of its body."""

    def __init__(self, reason: str) -> None:
        ConnectionError.__init__(self, f"in-flight answer aborted: {reason}")


def on_this_host(client_ip: str, server_ip: str) -> bool:
    """Whether a connection from `client_ip` to `server_ip` came from this host: loopback, or
    from the very address it arrived at (Linux picks that source for a local destination).

    Only such clients (containerd on this node) may make the registry fetch from upstream:
    anyone else reaching the registry port could otherwise make it dial any host a ``"*"``
    mirror allows (an open proxy).
    """
    try:
        client = ipaddress.ip_address(client_ip.partition("%")[0])
        server = ipaddress.ip_address(server_ip.partition("%")[0].strip("[]"))
    except ValueError:
        return False
    client = _unmapped(client)
    return client.is_loopback or client == _unmapped(server)


def _unmapped(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def request_on_this_host(request: AnyRequest) -> bool:
    """:func:`on_this_host` for a Sanic request (False when the socket says nothing)."""
    info = request.conn_info
    if info is None or not isinstance(info.sockname, tuple):
        return False
    return on_this_host(info.client_ip, str(info.sockname[0]))


@dataclass(frozen=True, slots=True)
class Answered:
    """The request was answered from in-flight state (`response` None: already streamed)."""

    response: HTTPResponse | None


async def answer_peer(
    request: AnyRequest, route: Route, registry: str, key: str, coordinator: Coordinator
) -> Answered | None:
    """A peer's request for something this node is fetching right now, or None."""
    if route.kind is Kind.BLOB:
        assert route.digest is not None
        spool = await coordinator.peer_spool(
            route.digest, coordinator.settings.section.stall_timeout
        )
        if spool is None:
            return None
        return Answered(
            await send_spool(request, spool, registry, coordinator.settings.section.stall_timeout)
        )
    manifest = await coordinator.peer_manifest(
        route.digest if route.digest is not None else key,
        coordinator.settings.section.stall_timeout,
    )
    if manifest is None:
        return None
    return Answered(manifest_response(request, manifest, registry))


async def answer_local_miss(
    request: AnyRequest,
    route: Route,
    registry: str,
    key: str,
    coordinator: Coordinator,
    miss: OciError,
    relay: Relay | None,
) -> HTTPResponse | None:
    """Answer a local client's miss through the cluster's one upstream fetch; raises `miss`
    (extended with the reason) when nobody will fetch it for this request."""
    settings = coordinator.settings
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + settings.section.holder_wait
    # Upstream spells Docker Hub's official images library/<name>, as containerd does.
    repository = normalize_name(registry, route.name)
    while True:
        claim: BlobClaim | ManifestClaim
        if route.kind is Kind.BLOB:
            assert route.digest is not None
            claim = await coordinator.claim_blob(registry, repository, route.digest)
        else:
            reference = route.digest if route.digest is not None else route.tag
            assert reference is not None
            # A digest is its own key; a tag's key is its store key (`key`).
            window_key = route.digest if route.digest is not None else key
            claim = await coordinator.claim_manifest(registry, repository, reference, window_key)
        if isinstance(claim, Fetching):
            return await send_spool(request, claim.spool, registry, settings.section.stall_timeout)
        if isinstance(claim, UpstreamManifest):
            return manifest_response(request, claim, registry)
        if isinstance(claim, Unavailable):
            raise _extended(miss, claim.reason)
        if relay is not None:
            # The holder advertised the key: the ordinary relay finds it as a provider.
            with contextlib.suppress(OciError):
                return await relay()
        if loop.time() >= give_up_at:
            raise _extended(miss, f"{claim.holder} holds the fetch lease but did not serve it")
        await asyncio.sleep(settings.retry_interval_s)


def _extended(miss: OciError, reason: str) -> OciError:
    miss.message = f"{miss.message}; not fetched for the cluster either ({reason})"
    miss.args = (f"{miss.code}: {miss.message}",)
    return miss


def manifest_response(
    request: AnyRequest, manifest: UpstreamManifest, registry: str
) -> HTTPResponse:
    """A manifest answer (GET or HEAD) from the manifest window."""
    size = len(manifest.body)
    headers = manifest_headers(manifest.digest, size, manifest.media_type, registry)
    content_type = headers.pop("Content-Type")
    body = b"" if request.method == "HEAD" else manifest.body
    if request.method != "HEAD":
        request.ctx.bytes_sent = size
    return HTTPResponse(body, headers=headers, content_type=content_type)


async def send_spool(
    request: AnyRequest, spool: Spool, registry: str, stall_s: float
) -> HTTPResponse | None:
    """Answer `request` (GET or HEAD, with or without Range) from `spool`, waiting for bytes
    not written yet. A spool failing before the first byte is a 404; after it, the
    connection is cut (SpoolAbortedError)."""
    byte_range = select_range(request.headers.get("range"), spool.size, registry)
    headers = blob_headers(spool.digest, spool.size, registry, byte_range)
    status = 200 if byte_range is None else 206
    if request.method == "HEAD":
        return HTTPResponse(b"", status=status, headers=headers)
    offset, count = (0, spool.size) if byte_range is None else (byte_range.start, byte_range.length)
    if count and request.transport.get_extra_info("ssl_object") is None:
        spool_file = _open(spool)
        if spool_file is not None:
            with spool_file:
                await _sendfile(
                    request, status, headers, spool, spool_file, (offset, count), stall_s
                )
                return None
    chunks = _held_back(spool, offset, count, stall_s)
    try:
        # The first piece is read before the headers go out: a spool that fails that early
        # still gets a clean 404 (and containerd's own fallback).
        first = await anext(chunks, b"")
    except SpoolFailedError as exc:
        await chunks.aclose()
        raise _not_fetched(spool, exc) from None
    try:
        await send_chunks(request, status, headers, first, chunks)
    except SpoolFailedError as exc:
        _drop(request)
        raise SpoolAbortedError(str(exc)) from exc
    finally:
        await chunks.aclose()
    return None


def _not_fetched(spool: Spool, exc: SpoolFailedError) -> OciError:
    """The 404 for a spool that failed before the first byte was sent."""
    return OciError(
        ErrorCode.BLOB_UNKNOWN,
        f"blob {spool.digest} could not be fetched for the cluster ({exc})",
        detail={"digest": spool.digest},
    )


def _open(spool: Spool) -> BinaryIO | None:
    """The spool file opened for this answer (None once it was deleted: the stream path then
    reads through the spool's own descriptor)."""
    try:
        return open(spool.path, "rb", buffering=0)
    except OSError:
        return None


async def _sendfile(
    request: AnyRequest,
    status: int,
    headers: dict[str, str],
    spool: Spool,
    spool_file: BinaryIO,
    span: tuple[int, int],
    stall_s: float,
) -> None:
    """The plain-TCP path: the kernel copies each readable span of the spool file to the
    socket (no body byte passes through Python), the span that ends the answer only once the
    blob is verified."""
    offset, count = span
    try:
        await spool.readable(offset, stall_s)
    except SpoolFailedError as exc:
        raise _not_fetched(spool, exc) from None
    response = await request.respond(status=status, headers=headers)
    loop = asyncio.get_running_loop()
    position, end, sent = offset, offset + count, 0
    try:
        await response.send(b"", end_stream=False)
        while position < end:
            take = min(end - position, await spool.readable(position, stall_s))
            if position + take >= end:
                await spool.verdict(stall_s)
            sent += await loop.sendfile(request.transport, spool_file, position, take)  # type: ignore[arg-type]
            position += take
            request.ctx.bytes_sent = sent
    except SpoolFailedError as exc:
        _drop(request)
        raise SpoolAbortedError(str(exc)) from exc
    except (ConnectionError, OSError, RuntimeError) as exc:
        # RuntimeError: asyncio refuses to send on a transport that is already closing.
        _drop(request)
        raise ClientGoneError(exc) from exc
    body_sent_outside_sanic(request, sent)
    await response.send(b"", end_stream=True)


async def _held_back(
    spool: Spool, offset: int, count: int, stall_s: float
) -> AsyncGenerator[bytes, None]:
    """The spool's bytes, the piece that ends the answer only once the blob is verified."""
    position, end = offset, offset + count
    if count == 0:
        await spool.verdict(stall_s)
    async for chunk in spool.read(offset, count, stall_s):
        position += len(chunk)
        if position >= end:
            await spool.verdict(stall_s)
        yield chunk


def _drop(request: AnyRequest) -> None:
    with contextlib.suppress(Exception):
        request.transport.close()
