"""Serves a local miss from peers: provider lookup, hedged requests, verified relay, resume.

The flow of one relayed request (the registry's hook calls :meth:`Mirror.relay`):

1. discovery is asked for providers of the key (a tag reference or a digest); the first one is
   used as soon as it arrives, waiting at most ``registry.resolve_timeout``;
2. a race of attempts: the least-used, fastest untried peer is asked; when no attempt has its
   response headers after the hedge delay (see :mod:`hedging`), one more peer is asked; the first
   good answer wins and the others are cancelled; failed attempts are replaced by the next peer
   until ``registry.max_attempts`` requests were made;
3. manifests are read whole (at most 4 MiB) and served only once their bytes hash to the digest
   asked for, or for a tag to the digest the peer names, typed by the ``mediaType`` the body
   declares (see :func:`relay_core.manifest_answer`). HEAD is answered the same way (a GET to
   the peer), since a tag's digest is only as good as the body behind it;
4. blobs stream through the pure :class:`relay_core.BlobRelay`, which decides everything: what
   reaches the client (as it arrives, the window's final piece only once the digest is known),
   when a peer is left for the next one (failed, stalled, too slow, past its deadline; the rest
   is asked for by Range), who is ranked down or quarantined, and when the client is cut off.
   This module only does the I/O it asks for: one data path for plain TCP and TLS alike. It
   also keeps the core's reference rate (the fastest other provider's) current while a body is
   read, and, when no rate is known at all (a node's first pull), measures another provider
   on a small Range so that a congested peer is not kept for a whole blob.

Every failure before the first byte is sent is a 404 carrying the local error's code, with the
attempt count in its ``detail``, so containerd falls back to its next endpoint at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar, cast

import aiohttp
from sanic import HTTPResponse, Request

from services.common.config import NodeConfig, RegistrySection
from services.common.discovery_router import GrpcRouter, Router
from services.common.logsetup import get_logger
from services.common.oci.errors import OciError
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
from services.registry.mirror import relay_core as core
from services.registry.mirror.hedging import Peer, PeerBook
from services.registry.mirror.peer_fetch import PeerClient, peer_url
from services.registry.mirror.peer_socket import Head, PeerSocket, in_thread
from services.registry.mirror.providers import ProviderLookup
from services.registry.mirror.quarantine import Quarantine
from services.registry.mirror.verify import (
    DigestMismatchError,
    PeerAnswerError,
    check_blob_answer,
)
from services.registry.paths import Kind, Route
from services.registry.ranges import ByteRange
from services.registry.stats import RegistryStats
from services.registry.transfer import ClientGoneError

# Body bytes read from a peer at most at once (a read takes what has arrived, up to this).
CHUNK_BYTES = 1024 * 1024
# How often a worker waiting for the event loop to send its bytes checks for a cancel.
HAND_OVER_POLL_S = 0.5
# Pieces a body worker may read ahead of what the event loop has sent: the next piece is
# received, decrypted and hashed while the loop encrypts and sends the one before.
PIPELINE = 2
# How often a body being read learns the fastest rate now known of another provider (other
# relays measure peers meanwhile); well within the early judgement's fifth of a rate window.
REFERENCE_REFRESH_S = 0.05
# A blob is probed (see _BodyRelay._probe_if_blind) only when it is at least this many probes.
PROBE_SHARE = 4
# Failure reasons kept per request for the 404's message (the count is in `detail`).
REASONS_SHOWN = 3
# Full reads that prove which contributor of a failed body lied, running at once per node: they
# follow a body that failed, so a flood of them means peers lie, and more would not help.
MAX_PROOFS = 4

log = get_logger(__name__)

T = TypeVar("T")
AnyRequest = Request[Any, Any]
# Peer errors: the network, aiohttp's protocol and timeout errors, and unusable answers.
_PEER_ERRORS = (aiohttp.ClientError, TimeoutError, OSError, PeerAnswerError)


class RelayAbortedError(ClientGoneError):
    """A relayed body could not be completed correctly, so the client connection was cut."""

    def __init__(self, reason: str) -> None:
        ConnectionError.__init__(self, f"relay aborted: {reason}")


@dataclass(slots=True)
class _BlobAnswer:
    """A peer's blob answer whose headers passed the checks; its body is still unread (GET: on
    `sock`, `early` first; HEAD: no body)."""

    peer: Peer
    status: int
    span: ByteRange
    sock: PeerSocket | None = None
    early: bytes = b""


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
        mirror = self.mirror
        return [
            p for p in self.lookup.found if p not in self.tried and not mirror.is_quarantined(p)
        ]

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

    def failed(self, peer: Peer, error: BaseException | str) -> None:
        reason = f"{peer}: {error}" if str(error) else f"{peer}: {type(error).__name__}"
        self.reasons.append(reason)
        if isinstance(error, DigestMismatchError):
            # A manifest is read whole from one peer: its mismatch is proof against it.
            self.mirror.quarantine_peer(peer, str(error))
        else:
            log.info("peer attempt failed", key=self.lookup.key, peer=str(peer), error=reason)

    def takeovers(self, current: Peer) -> list[Peer]:
        """The untried providers, other than `current`, that could take over its body (not
        quarantined, not ranked down as slow)."""
        book = self.mirror.book
        return [p for p in self._candidates() if p != current and not book.is_slow(p)]

    def probe_target(self, current: Peer) -> Peer | None:
        """The provider to measure while `current` is judged blind: no rate is known of any
        peer but `current` itself, whose own rate says nothing of what another provider would
        give. The one of those that could take over it that a relay would choose; None when
        there is none, or when a rate to judge `current` by is known."""
        book = self.mirror.book
        if book.peak_rate(current) is not None:
            return None
        return book.choose(self.takeovers(current))

    def reference_rate(self, current: Peer) -> float | None:
        """What `current` is judged against: the fastest known rate of another provider that
        could take over, or, when none of them is known, the best rate this node's relays get
        from any peer, `current`'s own earlier rate included (an untried provider is likely to
        be as good). None when no provider could take over but ones already left for being
        slow: then `current` is kept, unless it is below the floor (a relay never trades a
        peer for one known to be slower)."""
        book = self.mirror.book
        candidates = self.takeovers(current)
        if not candidates:
            return None
        known = core.best_rate([book.rate(p) for p in candidates])
        return known if known is not None else book.peak_rate()

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
        settings: RegistrySection,
        discovery: Router,
        client: PeerClient,
        *,
        book: PeerBook | None = None,
        quarantine: Quarantine[str] | None = None,
    ) -> None:
        self.settings = settings
        self.discovery = discovery
        self.client = client
        self.book = book if book is not None else PeerBook()
        # Keyed by the node's identity: a node cannot dodge it by advertising another port.
        self.quarantine: Quarantine[str] = (
            quarantine if quarantine is not None else Quarantine(settings.quarantine_duration)
        )
        self._proofs: set[asyncio.Task[None]] = set()
        self._probes: set[asyncio.Task[None]] = set()  # see probe_rate
        # Prometheus metrics of the mirror path; set by the app (None in bare unit tests).
        self.metrics: MirrorMetrics | None = None

    @classmethod
    def from_config(cls, cfg: NodeConfig) -> Mirror:
        settings = cfg.registry
        return cls(
            settings,
            GrpcRouter(cfg.discovery.local_address, cfg.grpc.max_message_bytes),
            PeerClient(settings.peer_timeout, _peer_ssl_context(cfg)),
        )

    async def close(self) -> None:
        background = self._proofs | self._probes
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await asyncio.gather(self.client.close(), self.discovery.close())

    def is_quarantined(self, peer: Peer) -> bool:
        return peer.identity in self.quarantine

    def quarantine_peer(self, peer: Peer, reason: str) -> None:
        self.quarantine.add(peer.identity)
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
        lookup = ProviderLookup(
            self.discovery, lookup_key, s.max_providers, max(s.resolve_timeout, s.peer_timeout)
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
        """One request to `peer` through the pooled client, returned once its headers are in.
        The peer counts as busy until the caller calls ``book.end(peer)``."""
        segment = "manifests" if route.kind is Kind.MANIFEST else "blobs"

        async def exchange() -> aiohttp.ClientResponse:
            return await self.client.request(
                method, peer, route.name, segment, route.reference, registry, headers
            )

        return await self._timed(peer, headers_in, route, exchange)

    async def _timed(
        self,
        peer: Peer,
        headers_in: asyncio.Event,
        route: Route,
        exchange: Callable[[], Coroutine[Any, Any, T]],
    ) -> T:
        """Run `exchange` (a request to `peer`, up to its response headers) within the peer
        timeout, keeping the peer book and metrics. On failure the peer is no longer busy."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        self.book.begin(peer)
        try:
            async with asyncio.timeout(self.settings.peer_timeout):
                result = await exchange()
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
        return result

    # --- manifests --------------------------------------------------------------------------

    async def _fetch_manifest(
        self, peer: Peer, headers_in: asyncio.Event, route: Route, registry: str, accept: str
    ) -> core.PeerManifest:
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

    async def _read_manifest(
        self, response: aiohttp.ClientResponse, route: Route
    ) -> core.PeerManifest:
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
        return core.manifest_answer(
            route.digest, response.headers, body, digest_header=DIGEST_HEADER
        )

    async def _manifest(
        self,
        request: AnyRequest,
        route: Route,
        registry: str,
        pull: _Pull,
        stats: RegistryStats,
    ) -> HTTPResponse:
        accept = request.headers.get("accept", "")

        async def attempt(peer: Peer, headers_in: asyncio.Event) -> core.PeerManifest:
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
        """Ask `peer` for the blob (a GET on a worker thread's socket, see peer_socket; a HEAD
        through the pooled client) and check its answer's headers."""
        assert route.digest is not None
        headers = {"Range": range_header} if range_header else {}
        if method == "HEAD":
            response = await self._open(peer, headers_in, method, route, registry, headers)
            try:
                status, span = self._check_blob(
                    response.status, response.headers, route, wanted, ranged=bool(range_header)
                )
            finally:
                response.close()
                self.book.end(peer)
            return _BlobAnswer(peer, status, span)
        sock = PeerSocket(peer.address, peer.port, self.client.ssl_context)
        target = peer_url(peer, route.name, "blobs", route.reference, registry).raw_path_qs
        headers = {**self.client.request_headers(), **headers}
        timeout = self.settings.peer_timeout

        async def exchange() -> Head:
            return await in_thread(
                lambda: sock.request(target, headers, timeout),
                sock.close,
                name="relay-peer",
                wait=False,
            )

        try:
            head = await self._timed(peer, headers_in, route, exchange)
            status, span = self._check_blob(
                head.status, head.headers, route, wanted, ranged=bool(range_header)
            )
        except BaseException:
            sock.close()
            raise
        return _BlobAnswer(peer, status, span, sock, head.early)

    def _check_blob(
        self, status: int, headers: Any, route: Route, wanted: ByteRange | None, *, ranged: bool
    ) -> tuple[int, ByteRange]:
        """The status and span of a peer's blob answer; a 206 only to a request with a Range."""
        assert route.digest is not None
        if status not in (200, 206) or (not ranged and status != 200):
            raise PeerAnswerError(f"answered {status}")
        span = check_blob_answer(status, headers, route.digest, wanted, digest_header=DIGEST_HEADER)
        return status, span

    def start_probe(self, peer: Peer, route: Route, registry: str, size: int) -> asyncio.Task[None]:
        """Run probe_rate in the background (cancel the task when its answer is not wanted)."""
        task = asyncio.create_task(self.probe_rate(peer, route, registry, size), name="rate-probe")
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)
        return task

    async def probe_rate(self, peer: Peer, route: Route, registry: str, size: int) -> None:
        """Measure `peer`'s body rate on a Range of `registry.rate_probe_bytes` from the middle
        of the blob (the bytes are dropped) and enter it in the peer book, so a relay that knows
        no rate has one to judge its own peer by. Failures only leave the rate unknown."""
        length = self.settings.rate_probe_bytes
        start = max(0, size // 2 - length // 2)
        if self.metrics is not None:
            self.metrics.rate_probed()
        wanted = ByteRange(start, start + length - 1, size)
        read = await self._read_body(
            peer, route, registry, wanted, length, lambda _: None, "rate probe"
        )
        if read is not None and read[0] >= length and read[1] > 0:
            rate = read[0] / read[1]
            self.book.observe_rate(peer, rate)
            log.info("rate probed", peer=str(peer), rate=round(rate))

    async def _read_body(
        self,
        peer: Peer,
        route: Route,
        registry: str,
        wanted: ByteRange | None,
        length: int,
        consume: Callable[[core.Chunk], object],
        what: str,
    ) -> tuple[int, float] | None:
        """GET the blob (`wanted` of it; all when None) from `peer`, outside any client's
        relay, and feed at most `length` bytes of its body to `consume` on a worker thread,
        for at most registry.peer_attempt_timeout: (bytes read, seconds the body took once its
        headers were in), or None when `peer` could not be read (logged as "`what` failed")."""
        range_header = None if wanted is None else wanted.range_header()
        try:
            answer = await self.open_blob(
                peer, asyncio.Event(), "GET", route, registry, range_header, wanted
            )
        except _PEER_ERRORS as exc:
            log.info(f"{what} failed", peer=str(peer), error=str(exc))
            return None
        sock = answer.sock
        assert sock is not None

        def read() -> int:
            early, answer.early = answer.early[:length], b""
            consume(early)
            got = len(early)
            deadline = time.monotonic() + self.settings.peer_attempt_timeout
            while got < length and time.monotonic() < deadline:
                data = sock.read(min(CHUNK_BYTES, length - got), self.settings.peer_timeout)
                if not data:
                    break
                consume(data)
                got += len(data)
            return got

        started = time.monotonic()
        try:
            got = await in_thread(read, sock.cancel, name=what.replace(" ", "-"))
        except _PEER_ERRORS as exc:
            log.info(f"{what} failed", peer=str(peer), error=str(exc))
            return None
        finally:
            self.drop_answer(answer)
        return got, time.monotonic() - started

    def drop_answer(self, answer: _BlobAnswer) -> None:
        """Done with `answer`: its socket is closed (a blob exchange is one per connection)."""
        if answer.sock is not None:
            answer.sock.close()
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
        blob = core.BlobRelay(digest, span.size, window, self.settings)
        relay = _BodyRelay(self, request, response, blob, stats)
        try:
            await relay.run(pull, route, registry, answer)
        finally:
            request.ctx.bytes_sent = relay.sent
        return None

    # --- proof ------------------------------------------------------------------------------

    def prove(self, evidence: core.Evidence, route: Route, registry: str) -> None:
        """Find out, in the background, which contributor of a failed body lied (full reads
        of the blob from them, the likeliest honest one first), and quarantine it."""
        if len(self._proofs) >= MAX_PROOFS:
            log.warning("relay proof skipped: too many running", digest=evidence.digest)
            return
        task = asyncio.create_task(self._prove(evidence, route, registry), name="relay-proof")
        self._proofs.add(task)
        task.add_done_callback(self._proofs.discard)

    async def _prove(self, evidence: core.Evidence, route: Route, registry: str) -> None:
        for suspect in evidence.suspects():
            if self.is_quarantined(suspect):
                continue
            check = evidence.check(suspect)
            what = "relay proof read"
            read = await self._read_body(
                suspect, route, registry, None, evidence.size, check.update, what
            )
            if read is None:
                continue
            liar = check.verdict()
            if check.received == evidence.size:
                if liar is not None:
                    self.quarantine_peer(liar, f"its bytes of {evidence.digest} are not the blob's")
                return


def _piece_buffers(actions: list[core.Action]) -> list[object]:
    """The receive buffers the pieces sent by `actions` are views of."""
    return [
        action.data.obj
        for action in actions
        if isinstance(action, core.Send) and isinstance(action.data, memoryview)
    ]


class _BodyRelay:
    """The I/O of one relayed blob body: reads peers, carries out what the core decides."""

    def __init__(
        self,
        mirror: Mirror,
        request: AnyRequest,
        response: Any,
        blob: core.BlobRelay,
        stats: RegistryStats,
    ) -> None:
        self.mirror = mirror
        self.request = request
        self.response = response
        self.blob = blob
        self.stats = stats
        self.sent = 0
        # The rate probe of this body (see _probe_if_blind): at most one, while it is wanted.
        self._probe: asyncio.Task[None] | None = None
        self._probed = False

    async def run(self, pull: _Pull, route: Route, registry: str, answer: _BlobAnswer) -> None:
        blob = self.blob
        current: _BlobAnswer | None = answer
        actions = blob.begin(answer.peer, time.monotonic(), pull.reference_rate(answer.peer))
        self._probe_if_blind(pull, route, registry, answer.peer)
        try:
            while True:
                resume = await self._act(actions, route, registry)
                if blob.done:
                    return
                if resume is not None:
                    assert current is not None
                    if self._probe is not None:
                        self._probe.cancel()  # it was to judge the attempt that is over now
                        self._probe = None
                    pull.failed(current.peer, resume.reason)
                    self.mirror.drop_answer(current)
                    current = None
                    try:
                        current = await self._resume(pull, route, registry, resume)
                    except OciError as miss:
                        actions = blob.exhausted(miss.message)
                        continue
                    if self.mirror.metrics is not None:
                        self.mirror.metrics.relay_resumed()
                    log.info(
                        "blob relay resumed",
                        digest=blob.digest,
                        offset=blob.offset,
                        peer=str(current.peer),
                    )
                    actions = blob.begin(
                        current.peer, time.monotonic(), pull.reference_rate(current.peer)
                    )
                    continue
                assert current is not None
                watch = functools.partial(self._watch, pull, route, registry, current.peer)
                actions = await self._pump(current, route, registry, watch)
        finally:
            if self._probe is not None:
                self._probe.cancel()
            if current is not None:
                self.mirror.drop_answer(current)

    def _watch(self, pull: _Pull, route: Route, registry: str, current: Peer) -> None:
        """Keep the core's reference rate for `current` up to date, and probe once a provider
        to measure becomes known (discovery may name it after the relay began)."""
        self.blob.refer_to(pull.reference_rate(current))
        self._probe_if_blind(pull, route, registry, current)

    def _probe_if_blind(self, pull: _Pull, route: Route, registry: str, current: Peer) -> None:
        """With no rate known to judge `current` by (see _Pull.probe_target), measure another
        provider meanwhile (see Mirror.probe_rate; the reference refresh in _pump picks the rate
        up): a node's first pull must not keep a congested peer for a whole blob. At most once
        per body, and only for blobs of at least PROBE_SHARE probes."""
        mirror = self.mirror
        length = mirror.settings.rate_probe_bytes
        if self._probed or length <= 0 or self.blob.size - self.blob.offset < PROBE_SHARE * length:
            return
        other = pull.probe_target(current)
        if other is None:
            return
        self._probed = True
        self._probe = mirror.start_probe(other, route, registry, self.blob.size)

    async def _pump(
        self,
        answer: _BlobAnswer,
        route: Route,
        registry: str,
        watch: Callable[[], None],
    ) -> list[core.Action]:
        """Read `answer`'s body on a worker thread, which feeds the core (and so decrypts and
        hashes) there, while this loop sends the bytes it hands over, in order, at most
        PIPELINE pieces behind, and calls `watch()` every REFERENCE_REFRESH_S (it keeps the
        core's reference rate current). Returns, once those are sent, the core's first actions
        that are more than sending bytes (a resume, the verdict)."""
        loop = asyncio.get_running_loop()
        sock = answer.sock
        assert sock is not None
        stop = threading.Event()
        free = threading.Semaphore(PIPELINE)  # pieces the worker may hand over unsent
        handed: asyncio.Queue[list[core.Action] | None] = asyncio.Queue()
        failure: list[BaseException] = []

        def cancel() -> None:
            stop.set()
            sock.cancel()

        async def sender() -> None:
            while (actions := await handed.get()) is not None:
                try:
                    await self._act(actions, route, registry)
                except BaseException as exc:
                    failure.append(exc)
                    cancel()
                    raise
                finally:
                    # Sent or abandoned: their buffers serve later reads once nothing
                    # refers to them (the list is the last holder of the pieces here).
                    buffers = _piece_buffers(actions)
                    actions.clear()
                    for buffer in buffers:
                        sock.buffers.give_back(buffer)
                    free.release()

        def hand_over(actions: list[core.Action]) -> None:
            while not free.acquire(timeout=HAND_OVER_POLL_S):
                if stop.is_set():
                    return
            loop.call_soon_threadsafe(handed.put_nowait, actions)

        def work() -> list[core.Action]:
            blob = self.blob
            early, answer.early = answer.early, b""
            while True:
                now = time.monotonic()
                if early:
                    actions = blob.received(early[: blob.size - blob.offset], now)
                    early = b""
                else:
                    want = min(CHUNK_BYTES, blob.size - blob.offset)
                    try:
                        data = sock.read(want, blob.next_check(now))
                    except TimeoutError:
                        actions = blob.tick(time.monotonic())
                    except OSError as exc:
                        actions = blob.failed(f"{type(exc).__name__}: {exc}", time.monotonic())
                    else:
                        now = time.monotonic()
                        actions = blob.received(data, now) if data else blob.ended(now)
                        # The core keeps what it needs; a view kept here while the next read
                        # waits would keep its buffer from being reused.
                        del data
                if not all(isinstance(a, core.Send | core.RecordRate) for a in actions):
                    return actions
                if actions:
                    hand_over(actions)

        async def refresh() -> None:
            while True:
                await asyncio.sleep(REFERENCE_REFRESH_S)
                watch()

        sending = asyncio.create_task(sender(), name="relay-send")
        refreshing = asyncio.create_task(refresh(), name="relay-reference")
        try:
            actions = await in_thread(work, cancel, name="relay-body")
            handed.put_nowait(None)
            with contextlib.suppress(BaseException):
                await sending
        finally:
            refreshing.cancel()
            sending.cancel()
        if failure:
            raise failure[0]
        return actions

    async def _resume(
        self, pull: _Pull, route: Route, registry: str, resume: core.Resume
    ) -> _BlobAnswer:
        wanted = ByteRange(resume.start, resume.end, self.blob.size)
        attempt = functools.partial(
            self.mirror.open_blob,
            method="GET",
            route=route,
            registry=registry,
            range_header=wanted.range_header(),
            wanted=wanted,
        )
        _, answer = await self.mirror.race(pull, attempt, self.mirror.drop_answer)
        return answer

    async def _act(
        self, actions: list[core.Action], route: Route, registry: str
    ) -> core.Resume | None:
        """Carry out `actions` in order; the Resume among them is left to the caller."""
        resume: core.Resume | None = None
        mirror = self.mirror
        for action in actions:
            match action:
                case core.Send(data):
                    await self._send(data, end_stream=False)
                case core.Finish(data):
                    await self._send(data, end_stream=True)
                case core.Resume():
                    resume = action
                case core.RecordRate(peer, rate):
                    mirror.book.observe_rate(peer, rate)
                case core.RankDown(peer, rate, reason, rule):
                    mirror.book.rank_down(peer, rate)
                    if mirror.metrics is not None:
                        mirror.metrics.peer_ranked_down(rule)
                    log.info("slow peer ranked down", peer=str(peer), reason=reason)
                case core.QuarantinePeer(peer, reason):
                    mirror.quarantine_peer(peer, reason)
                case core.Prove(evidence):
                    mirror.prove(evidence, route, registry)
                case core.AbortClient(reason):
                    self._abort(reason)
        return resume

    async def _send(self, data: core.Chunk, *, end_stream: bool) -> None:
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
        log.warning("blob relay aborted", reason=reason, sent=self.sent)
        self._drop_client()
        raise RelayAbortedError(reason)
