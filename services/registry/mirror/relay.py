"""Serves a local miss from peers: provider lookup, hedged requests, verified relay, resume.

The flow of one relayed request (the registry's hook calls :meth:`Mirror.relay`):

1. discovery is asked for providers of the key (a tag reference or a digest); the first one is
   used as soon as it arrives, waiting at most ``registry.resolve_timeout``;
2. a race of attempts: the least-used, fastest untried peer is asked; when no attempt has its
   response headers after the hedge delay (see :mod:`hedging`), one more peer is asked; the first
   good answer wins and the others are cancelled; failed attempts are replaced by the next peer
   until ``registry.max_attempts`` requests were made;
3. manifests are read whole (at most 4 MiB) and served only once their bytes hash to the digest
   asked for, or for a tag to the digest the peer names. HEAD is answered the same way (a GET to
   the peer), since a tag's digest is only as good as the body behind it;
4. blobs stream through with a running hash. A peer failing mid-body is replaced by the next one,
   asked for ``Range: bytes=<offset>-<end>``, so the client sees one uninterrupted body. The last
   chunk is held back until the hash is known: a body that does not hash to its digest is never
   completed — the client connection is cut short of its Content-Length — and every peer that
   contributed to it is quarantined. A client's Range is served the same way: the whole blob is
   read from the peers and hashed, only the range is sent, and its last piece waits for the
   verdict (a resume at offset N costs N extra bytes from the peer; that buys a 206 body that is
   never complete unless the blob it came from is the one asked for).

Every failure before the first byte is sent is a 404 carrying the local error's code, with the
attempt count in its ``detail``, so containerd falls back to its next endpoint at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar, cast

import aiohttp
from sanic import HTTPResponse, Request

from services.common.config import NodeConfig, RegistrySection
from services.common.logsetup import get_logger
from services.common.oci.errors import OciError
from services.common.oci.grammar import GrammarError, parse_digest
from services.common.oci.media_types import detect_manifest_media_type, is_manifest_media_type
from services.common.tls import client_context, tls_files
from services.registry.content import MAX_MANIFEST_BYTES
from services.registry.headers import (
    DIGEST_HEADER,
    RangeNotSatisfiableError,
    blob_headers,
    manifest_headers,
    select_range,
)
from services.registry.metrics import MirrorMetrics
from services.registry.mirror import socket_pump
from services.registry.mirror.body_stream import Chunk, PeerBody, buffered_body
from services.registry.mirror.hedging import Peer, PeerBook
from services.registry.mirror.peer_fetch import PeerClient
from services.registry.mirror.providers import DiscoveryClient, ProviderLookup
from services.registry.mirror.quarantine import Quarantine
from services.registry.mirror.verify import (
    DigestMismatchError,
    PeerAnswerError,
    RunningHash,
    body_matches,
    check_blob_answer,
)
from services.registry.paths import Kind, Route
from services.registry.ranges import ByteRange
from services.registry.stats import RegistryStats
from services.registry.transfer import ClientGoneError, body_sent_outside_sanic

# Body pieces read from a peer and handed to the client; with the one chunk held back for
# verification this bounds a relay's memory to a few chunks.
CHUNK_BYTES = 1024 * 1024
# asyncio's plain socket transport before 3.12 copies what it cannot send at once, so a sent
# buffer is free again as soon as write() returns; later versions, TLS transports and other
# loops may keep a view of it until it is sent.
_ASYNCIO_WRITES_COPY = sys.version_info < (3, 12)
# Chunks at least this large are hashed in a worker thread (smaller ones cost less than the hop).
THREAD_HASH_BYTES = 64 * 1024
# A client that takes no body bytes for this long is dropped by a pump thread (the event-loop
# path has Sanic's response timeout instead); it frees the thread for other relays.
CLIENT_STALL_S = 60.0
# Failure reasons kept per request for the 404's message (the count is in `detail`).
REASONS_SHOWN = 3

log = get_logger("registry.mirror")

T = TypeVar("T")
AnyRequest = Request[Any, Any]
# Peer errors: the network, aiohttp's protocol and timeout errors, and unusable answers.
_PEER_ERRORS = (aiohttp.ClientError, TimeoutError, OSError, PeerAnswerError)


@dataclass(frozen=True, slots=True)
class MirrorSettings:
    """The relay's budgets and limits (see RegistrySection for their meaning)."""

    resolve_timeout: float = 0.05
    header_timeout: float = 0.04
    peer_timeout: float = 2.0
    max_providers: int = 3
    max_attempts: int = 4
    quarantine_duration: float = 300.0

    @classmethod
    def from_config(cls, section: RegistrySection) -> MirrorSettings:
        return cls(
            resolve_timeout=section.resolve_timeout,
            header_timeout=section.header_timeout,
            peer_timeout=section.peer_timeout,
            max_providers=section.max_providers,
            max_attempts=section.max_attempts,
            quarantine_duration=section.quarantine_duration,
        )


class RelayAbortedError(ClientGoneError):
    """A relayed body could not be completed correctly, so the client connection was cut."""

    def __init__(self, reason: str) -> None:
        ConnectionError.__init__(self, f"relay aborted: {reason}")


@dataclass(frozen=True, slots=True)
class _PeerManifest:
    digest: str
    body: bytes
    media_type: str


@dataclass(slots=True)
class _BlobAnswer:
    """A peer's blob answer whose headers passed the checks; its body is still unread."""

    peer: Peer
    response: aiohttp.ClientResponse
    status: int
    span: ByteRange


Attempt = Callable[[Peer, asyncio.Event], Coroutine[Any, Any, T]]


class _Pull:
    """One relayed request: its provider lookup, the peers tried and why they failed."""

    def __init__(self, mirror: Mirror, lookup: ProviderLookup, local_error: OciError) -> None:
        self.mirror = mirror
        self.lookup = lookup
        self.local_error = local_error
        self.tried: set[Peer] = set()
        self.attempts = 0
        self.reasons: list[str] = []

    def can_attempt(self) -> bool:
        return self.attempts < self.mirror.settings.max_attempts

    def _candidates(self) -> list[Peer]:
        quarantine = self.mirror.quarantine
        return [p for p in self.lookup.found if p not in self.tried and p not in quarantine]

    async def next_peer(self, *, wait: bool) -> Peer | None:
        """The best untried peer; with `wait`, waits (bounded by the resolve timeout) for
        discovery to name one when none is known yet."""
        while True:
            peer = self.mirror.book.choose(self._candidates())
            if peer is not None or not wait:
                return peer
            more = await self.lookup.wait_more(
                len(self.lookup.found), self.mirror.settings.resolve_timeout
            )
            if not more:
                return self.mirror.book.choose(self._candidates())

    def failed(self, peer: Peer, error: BaseException) -> None:
        reason = f"{peer}: {error}" if str(error) else f"{peer}: {type(error).__name__}"
        self.reasons.append(reason)
        if isinstance(error, DigestMismatchError):
            self.mirror.quarantine_peer(peer, str(error))
        else:
            log.info("peer attempt failed", key=self.lookup.key, peer=str(peer), error=reason)

    def miss(self) -> OciError:
        """The local error, now also saying that no peer served it (a 404 either way)."""
        error = self.local_error
        if self.reasons:
            why = "; ".join(self.reasons[-REASONS_SHOWN:])
        elif self.lookup.error is not None:
            why = self.lookup.error
        elif self.lookup.found:
            why = "every provider is quarantined"
        else:
            why = "no provider found"
        detail: dict[str, object] = (
            dict(error.detail) if isinstance(error.detail, dict) else {"local": error.detail}
        )
        detail.update(attempts=self.attempts, providers=len(self.lookup.found))
        # The error object is this request's own: extending it keeps its class (a store outage
        # stays counted as an error, a plain miss as not found).
        error.message = f"{error.message}; not served by peers either ({why})"
        error.detail = detail
        error.status = 404
        error.args = (f"{error.code}: {error.message}",)
        return error


def _peer_ssl_context(cfg: NodeConfig) -> ssl.SSLContext | None:
    """Client TLS context for peers when ``tls.enabled`` (see services.common.tls)."""
    files = tls_files(cfg)
    return client_context(files) if files is not None else None


class Mirror:
    """The mirror path of one registry: discovery client, peer client, peer book, quarantine."""

    def __init__(
        self,
        settings: MirrorSettings,
        discovery: DiscoveryClient,
        client: PeerClient,
        *,
        book: PeerBook | None = None,
        quarantine: Quarantine[Peer] | None = None,
    ) -> None:
        self.settings = settings
        self.discovery = discovery
        self.client = client
        self.book = book if book is not None else PeerBook()
        self.quarantine: Quarantine[Peer] = (
            quarantine if quarantine is not None else Quarantine(settings.quarantine_duration)
        )
        # Prometheus metrics of the mirror path; set by the app (None in bare unit tests).
        self.metrics: MirrorMetrics | None = None

    @classmethod
    def from_config(cls, cfg: NodeConfig) -> Mirror:
        settings = MirrorSettings.from_config(cfg.registry)
        return cls(
            settings,
            DiscoveryClient(cfg.discovery.local_address),
            PeerClient(settings.peer_timeout, _peer_ssl_context(cfg)),
        )

    async def close(self) -> None:
        await asyncio.gather(self.client.close(), self.discovery.close())

    def quarantine_peer(self, peer: Peer, reason: str) -> None:
        self.quarantine.add(peer)
        if self.metrics is not None:
            self.metrics.peer_quarantined()
        log.warning(
            "peer quarantined: it sent content not matching its digest",
            peer=str(peer),
            reason=reason,
            seconds=self.settings.quarantine_duration,
        )

    # --- entry point ------------------------------------------------------------------------

    async def relay(
        self,
        request: AnyRequest,
        route: Route,
        registry: str,
        key: str,
        local_error: OciError,
        stats: RegistryStats,
    ) -> HTTPResponse | None:
        """Answer `request` (a local miss of `route`, allowed by policy for `registry`) from
        peers. `key` is the store key of a tag request. Raises the extended `local_error` when
        no peer serves it, RelayAbortedError when a body had to be cut short."""
        lookup_key = route.digest if route.digest is not None else key
        s = self.settings
        lookup = self.discovery.find(
            lookup_key, limit=s.max_providers, deadline=max(s.resolve_timeout, s.peer_timeout)
        )
        pull = _Pull(self, lookup, local_error)
        try:
            if route.kind is Kind.MANIFEST:
                return await self._manifest(request, route, registry, pull, stats)
            return await self._blob(request, route, registry, pull, stats)
        finally:
            await lookup.close()
            if self.metrics is not None:
                self.metrics.resolved(*lookup.resolve_outcome())

    # --- the race ---------------------------------------------------------------------------

    async def race(
        self, pull: _Pull, attempt: Attempt[T], discard: Callable[[T], None]
    ) -> tuple[Peer, T]:
        """Run `attempt` against peers (hedged, failing over) until one succeeds; raises the
        pull's miss when none does. Results of attempts that lose are given to `discard`."""
        loop = asyncio.get_running_loop()
        running: dict[asyncio.Task[T], tuple[Peer, asyncio.Event]] = {}
        hedge_at: float | None = None
        provider_wait: asyncio.Task[bool] | None = None

        def launch(peer: Peer) -> None:
            nonlocal hedge_at
            if running and self.metrics is not None:
                self.metrics.hedge_fired()  # others still waiting for headers: a hedge
            pull.tried.add(peer)
            pull.attempts += 1
            headers_in = asyncio.Event()
            task = asyncio.create_task(attempt(peer, headers_in), name=f"peer {peer}")
            running[task] = (peer, headers_in)
            hedge_at = loop.time() + self.book.hedge_delay(self.settings.header_timeout)

        try:
            while True:
                if not running:
                    peer = await pull.next_peer(wait=True) if pull.can_attempt() else None
                    if peer is None:
                        raise pull.miss()
                    launch(peer)
                waiting: set[asyncio.Future[Any]] = set(running)
                if provider_wait is not None:
                    waiting.add(provider_wait)
                timeout = None if hedge_at is None else max(0.0, hedge_at - loop.time())
                done, _ = await asyncio.wait(
                    waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                retry_hedge = False
                if provider_wait is not None and provider_wait in done:
                    done.discard(provider_wait)
                    retry_hedge = provider_wait.result()
                    provider_wait = None
                for finished in done:
                    task = cast("asyncio.Task[T]", finished)
                    peer, _ = running.pop(task)
                    error = task.exception()
                    if error is None:
                        return peer, task.result()
                    pull.failed(peer, error)
                hedge_due = hedge_at is not None and loop.time() >= hedge_at
                if not (hedge_due or retry_hedge) or not running:
                    continue
                hedge_at = None
                if any(headers_in.is_set() for _, headers_in in running.values()):
                    continue
                if not pull.can_attempt():
                    continue
                peer = await pull.next_peer(wait=False)
                if peer is not None:
                    launch(peer)
                elif not pull.lookup.done and provider_wait is None:
                    # Headers are late and nobody else is known yet: hedge once discovery
                    # names another provider.
                    provider_wait = asyncio.create_task(
                        pull.lookup.wait_more(len(pull.lookup.found), self.settings.peer_timeout)
                    )
        finally:
            if provider_wait is not None:
                provider_wait.cancel()
            for task in running:
                task.cancel()
            if running:
                outcomes = await asyncio.gather(*running, return_exceptions=True)
                for outcome in outcomes:
                    if not isinstance(outcome, BaseException):
                        discard(outcome)

    async def _open(
        self,
        peer: Peer,
        headers_in: asyncio.Event,
        method: str,
        route: Route,
        registry: str,
        headers: dict[str, str],
    ) -> aiohttp.ClientResponse:
        """One request to `peer`, returned once its headers are in. The peer counts as busy
        until the caller calls ``book.end(peer)``; on failure that is done here."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        self.book.begin(peer)
        segment = "manifests" if route.kind is Kind.MANIFEST else "blobs"
        try:
            async with asyncio.timeout(self.settings.peer_timeout):
                response = await self.client.request(
                    method, peer, route.name, segment, route.reference, registry, headers
                )
        except BaseException as exc:
            self.book.end(peer)
            # Slow or dead: rank it behind peers that answer (a cancelled attempt lost a hedge).
            self.book.penalise(peer, loop.time() - started)
            if isinstance(exc, _PEER_ERRORS):
                if self.metrics is not None:
                    self.metrics.peer_fetched(route.kind.value, loop.time() - started, ok=False)
                raise PeerAnswerError(f"{type(exc).__name__}: {exc}") from exc
            raise
        self.book.observe(peer, loop.time() - started)
        if self.metrics is not None:
            self.metrics.peer_fetched(route.kind.value, loop.time() - started, ok=True)
        headers_in.set()
        return response

    # --- manifests --------------------------------------------------------------------------

    async def _fetch_manifest(
        self, peer: Peer, headers_in: asyncio.Event, route: Route, registry: str, accept: str
    ) -> _PeerManifest:
        headers = {"Accept": accept} if accept else {}
        # Manifests are small: the whole exchange gets the budget one peer read gets.
        async with asyncio.timeout(2 * self.settings.peer_timeout):
            response = await self._open(peer, headers_in, "GET", route, registry, headers)
            try:
                manifest = await self._read_manifest(response, route)
            except (aiohttp.ClientError, OSError) as exc:
                raise PeerAnswerError(f"{type(exc).__name__}: {exc}") from exc
            finally:
                # Read to the end: the connection goes back to the pool; otherwise it is closed.
                response.release()
                self.book.end(peer)
            return manifest

    async def _read_manifest(self, response: aiohttp.ClientResponse, route: Route) -> _PeerManifest:
        if response.status != 200:
            raise PeerAnswerError(f"answered {response.status}")
        length = response.content_length
        if length is not None and length > MAX_MANIFEST_BYTES:
            raise PeerAnswerError(f"manifest of {length} bytes is over the limit")
        parts: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(CHUNK_BYTES):
            size += len(chunk)
            if size > MAX_MANIFEST_BYTES:
                raise PeerAnswerError("manifest body is over the limit")
            parts.append(chunk)
        body = b"".join(parts)
        named = response.headers.get(DIGEST_HEADER)
        if route.digest is not None:
            expected = route.digest
        else:
            if named is None:
                raise PeerAnswerError(f"tag answer has no {DIGEST_HEADER} header")
            try:
                expected = str(parse_digest(named.strip()))
            except GrammarError as exc:
                raise PeerAnswerError(f"tag answer names an unusable digest: {exc}") from None
        if not body_matches(expected, body):
            raise DigestMismatchError(f"manifest body does not hash to {expected}")
        if named is not None and route.digest is not None and named.strip() != route.digest:
            raise PeerAnswerError(f"answer names {named.strip()}, not {route.digest}")
        media_type = response.headers.get("Content-Type", "").strip()
        if not is_manifest_media_type(media_type.split(";", 1)[0].strip()):
            detected = detect_manifest_media_type(body)
            if detected is None:
                raise PeerAnswerError("answer is not a manifest or index")
            media_type = detected
        return _PeerManifest(expected, body, media_type)

    async def _manifest(
        self,
        request: AnyRequest,
        route: Route,
        registry: str,
        pull: _Pull,
        stats: RegistryStats,
    ) -> HTTPResponse:
        accept = request.headers.get("accept", "")

        async def attempt(peer: Peer, headers_in: asyncio.Event) -> _PeerManifest:
            return await self._fetch_manifest(peer, headers_in, route, registry, accept)

        peer, manifest = await self.race(pull, attempt, lambda _: None)
        log.debug("manifest relayed", digest=manifest.digest, peer=str(peer))
        request.ctx.peer = str(peer)
        headers = manifest_headers(
            manifest.digest, len(manifest.body), manifest.media_type, registry
        )
        if request.method == "HEAD":
            return HTTPResponse(b"", headers=headers)
        stats.bytes_relayed += len(manifest.body)
        request.ctx.bytes_sent = len(manifest.body)
        content_type = headers.pop("Content-Type")
        return HTTPResponse(manifest.body, headers=headers, content_type=content_type)

    # --- blobs ------------------------------------------------------------------------------

    async def open_blob(
        self,
        peer: Peer,
        headers_in: asyncio.Event,
        method: str,
        route: Route,
        registry: str,
        range_header: str | None,
        wanted: ByteRange | None,
    ) -> _BlobAnswer:
        headers = {"Range": range_header} if range_header else {}
        response = await self._open(peer, headers_in, method, route, registry, headers)
        try:
            if response.status not in (200, 206) or (
                range_header is None and response.status != 200
            ):
                raise PeerAnswerError(f"answered {response.status}")
            assert route.digest is not None
            span = check_blob_answer(
                response.status, response.headers, route.digest, wanted, digest_header=DIGEST_HEADER
            )
        except BaseException:
            response.close()
            self.book.end(peer)
            raise
        return _BlobAnswer(peer, response, response.status, span)

    def drop_answer(self, answer: _BlobAnswer) -> None:
        """Done with `answer`: its connection is pooled again when the body was read to the
        end, closed otherwise."""
        answer.response.release()
        self.book.end(answer.peer)

    async def _blob(
        self,
        request: AnyRequest,
        route: Route,
        registry: str,
        pull: _Pull,
        stats: RegistryStats,
    ) -> HTTPResponse | None:
        digest = route.digest
        assert digest is not None
        method = "HEAD" if request.method == "HEAD" else "GET"
        client_range = request.headers.get("range")
        # A GET is always read whole from the peers, so that every relayed body, a client's
        # range included, is checked against the blob's digest before its last byte goes out.
        peer_range = client_range if method == "HEAD" else None

        async def first(peer: Peer, headers_in: asyncio.Event) -> _BlobAnswer:
            return await self.open_blob(peer, headers_in, method, route, registry, peer_range, None)

        _, answer = await self.race(pull, first, self.drop_answer)
        # The status page names the peer a relay started from.
        request.ctx.peer = str(answer.peer)
        span = answer.span
        if method == "HEAD":
            self.drop_answer(answer)
            partial = None if answer.status == 200 else span
            headers = blob_headers(digest, span.size, registry, partial)
            return HTTPResponse(b"", status=answer.status, headers=headers)
        try:
            byte_range = select_range(client_range, span.size, registry)
        except RangeNotSatisfiableError:
            self.drop_answer(answer)
            raise
        window = span if byte_range is None else byte_range
        headers = blob_headers(digest, span.size, registry, byte_range)
        response = await request.respond(status=200 if byte_range is None else 206, headers=headers)
        relay = _BodyRelay(self, request, response, RunningHash(digest), window, stats)
        try:
            await relay.run(pull, route, registry, answer)
        finally:
            request.ctx.bytes_sent = relay.sent
        return None


class _BodyRelay:
    """Streams one blob to the client from one or more peers (see the module docstring): the
    whole blob is read and hashed, the client's `window` of it is sent."""

    def __init__(
        self,
        mirror: Mirror,
        request: AnyRequest,
        response: Any,
        hasher: RunningHash,
        window: ByteRange,
        stats: RegistryStats,
    ) -> None:
        self.mirror = mirror
        self.request = request
        self.response = response
        self.hasher = hasher
        self.stats = stats
        self.size = window.size
        self.win_start = window.start
        self.win_end = window.end + 1
        self.offset = 0  # the next byte of the blob to read
        # The newest piece of the window read: sent once a newer one arrives, or once the
        # whole blob hashes to its digest.
        self.held: Chunk = b""
        self.contributors: list[Peer] = []
        self.sent = 0

    async def run(self, pull: _Pull, route: Route, registry: str, answer: _BlobAnswer) -> None:
        digest = route.digest
        assert digest is not None
        while True:
            self.contributors.append(answer.peer)
            try:
                await self._pump(answer.response)
                if self.offset < self.size:
                    raise PeerAnswerError(f"body ended at byte {self.offset}")
            except ClientGoneError:
                raise
            except _PEER_ERRORS as exc:
                pull.failed(answer.peer, exc)
            finally:
                self.mirror.drop_answer(answer)
            if self.offset >= self.size:
                break
            wanted = ByteRange(self.offset, self.size - 1, self.size)
            resume = functools.partial(
                self.mirror.open_blob,
                method="GET",
                route=route,
                registry=registry,
                range_header=f"bytes={wanted.start}-{wanted.end}",
                wanted=wanted,
            )
            try:
                _, answer = await self.mirror.race(pull, resume, self.mirror.drop_answer)
            except OciError as miss:
                self._abort(f"no peer could continue at byte {self.offset}: {miss.message}")
            log.info("blob relay resumed", digest=digest, offset=self.offset, peer=str(answer.peer))
        if not self.hasher.matches():
            for peer in dict.fromkeys(self.contributors):
                self.mirror.quarantine_peer(peer, f"blob body does not hash to {digest}")
            self._abort(f"relayed body does not hash to {digest}")
        await self._send(self.held, end_stream=True)

    def _window_part(self, start: int, length: int) -> tuple[int, int]:
        """Which bytes of `length` read at blob offset `start` belong to the client's window."""
        low = min(max(self.win_start - start, 0), length)
        high = min(max(self.win_end - start, 0), length)
        return low, max(low, high)

    async def _pump(self, peer_response: aiohttp.ClientResponse) -> None:
        if self.offset >= self.size:
            return
        if await self._pump_in_threads(peer_response):
            return
        body = PeerBody.take_over(
            peer_response,
            self.size - self.offset,
            chunk_bytes=CHUNK_BYTES,
            stall_timeout=self.mirror.settings.peer_timeout,
        )
        try:
            while self.offset < self.size:
                chunk = await body.next_chunk()
                if chunk is None:
                    if body.error is not None:
                        raise PeerAnswerError(body.error)
                    return
                await self._take(chunk, body)
        finally:
            body.close()

    async def _take(self, chunk: Chunk, body: PeerBody | None) -> None:
        """One chunk read at the current offset: hashed; its part in the window becomes the
        held piece, and the piece held before goes to the client meanwhile."""
        low, high = self._window_part(self.offset, len(chunk))
        self.offset += len(chunk)
        previous: Chunk = b""
        if high > low:
            previous, self.held = self.held, chunk[low:high]
        await self._hash_while_sending(chunk, previous)
        if body is None:
            return
        if high == low:
            body.give_back(chunk)  # hashed, neither sent nor held
        if previous:
            self._recycle(body, previous)

    async def _pump_in_threads(self, peer_response: aiohttp.ClientResponse) -> bool:
        """Relay the rest of `peer_response`'s body through a pump thread (socket_pump.py) when
        both connections are plain TCP; False, with nothing read, when they are not."""
        connection = peer_response.connection
        peer_transport = connection.transport if connection is not None else None
        client_transport = cast("asyncio.Transport", self.request.transport)
        peer_fd = socket_pump.plain_socket_fd(peer_transport)
        client_fd = socket_pump.plain_socket_fd(client_transport)
        if peer_transport is None or peer_fd is None or client_fd is None:
            return False
        if not socket_pump.can_pump():
            return False
        early = buffered_body(peer_response)
        socket_pump.park(peer_transport)
        try:
            if early:
                await self._take(early[: self.size - self.offset], None)
            if self.offset >= self.size:
                return True
            length = self.size - self.offset
            write_start, write_stop = self._window_part(self.offset, length)
            # The response head goes out first (Sanic sends it with the first body bytes); a
            # held piece goes too when more of the window follows (it is not the last then).
            if write_stop > write_start:
                await self._send(self.held, end_stream=False)
                self.held = b""
            else:
                await self._send(b"", end_stream=False)
            job = socket_pump.PumpJob(
                peer_fd=peer_fd,
                client_fd=client_fd,
                length=length,
                write_start=write_start,
                write_stop=write_stop,
                hasher=self.hasher,
                chunk_bytes=CHUNK_BYTES,
                peer_stall_s=self.mirror.settings.peer_timeout,
                client_stall_s=CLIENT_STALL_S,
            )
            await socket_pump.until_flushed(client_transport, CLIENT_STALL_S)
            outcome = await socket_pump.pump(job)
        except (socket_pump.ClientWriteError, TimeoutError) as exc:
            self._drop_client()
            raise ClientGoneError(exc) from exc
        finally:
            peer_transport.close()
        self.offset += outcome.received
        if outcome.held:
            self.held = outcome.held
        body_sent_outside_sanic(self.request, outcome.written)
        self.stats.bytes_relayed += outcome.written
        self.sent += outcome.written
        if outcome.peer_error is not None:
            raise PeerAnswerError(outcome.peer_error)
        return True

    def _recycle(self, body: PeerBody, sent: Chunk) -> None:
        """`sent` went to the client transport: its buffer is refilled unless the transport may
        still point into it (asyncio from 3.12 queues views of unsent data instead of copies)."""
        transport = cast("asyncio.WriteTransport", self.request.transport)
        copies = _ASYNCIO_WRITES_COPY and type(transport).__module__ == "asyncio.selector_events"
        if copies or transport.get_write_buffer_size() == 0:
            body.give_back(sent)
        else:
            body.forget(sent)

    async def _hash_while_sending(self, chunk: Chunk, previous: Chunk) -> None:
        """Feed `chunk` to the running hash while `previous` is sent. hashlib lets go of the GIL
        on large buffers, so a worker thread hashes while this loop moves bytes in and out."""
        if len(chunk) < THREAD_HASH_BYTES:
            self.hasher.update(chunk)
            if previous:
                await self._send(previous, end_stream=False)
            return
        hashing = asyncio.ensure_future(asyncio.to_thread(self.hasher.update, chunk))
        try:
            if previous:
                await self._send(previous, end_stream=False)
        finally:
            # Never leave an update running when this relay ends (chunks must go in order, and
            # the buffer must not be refilled while it is read).
            await asyncio.shield(hashing)

    async def _send(self, data: Chunk, *, end_stream: bool) -> None:
        try:
            await self.response.send(data, end_stream=end_stream)
        except (ConnectionError, OSError, RuntimeError) as exc:
            self._drop_client()
            raise ClientGoneError(exc) from exc
        self.stats.bytes_relayed += len(data)
        self.sent += len(data)

    def _drop_client(self) -> None:
        # abort(): drop whatever is still buffered, the connection ends at once.
        transport = self.request.transport
        with contextlib.suppress(Exception):
            getattr(transport, "abort", transport.close)()

    def _abort(self, reason: str) -> NoReturn:
        """Cut the client connection short of the announced length, so the client never takes
        what it received for a complete body."""
        log.warning("blob relay aborted", reason=reason, sent=self.offset - len(self.held))
        self._drop_client()
        raise RelayAbortedError(reason)
